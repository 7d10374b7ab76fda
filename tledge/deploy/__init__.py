"""Deploying to a Jetson: `tledge bundle` and the torch-free runtime package it ships (tledge_runtime)."""
