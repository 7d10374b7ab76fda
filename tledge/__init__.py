"""tledge: from a folder of labelled images to a fast, accurate model on an NVIDIA Jetson.

Importing this package imports no torch, onnx or tensorrt; heavy modules load on first use.
"""
__version__ = "0.1.0"
