"""tledge_runtime: runs a tledge bundle on a device with TensorRT (or onnxruntime) and numpy + Pillow only.

No torch and no tledge are imported here. Inside a bundle: `python3 -m tledge_runtime --help`.
The same package is part of tledge (tledge.deploy.tledge_runtime), which uses its preprocessing, CUDA
binding, timing and TensorRT code, so the device runs exactly what was tested.
"""
__version__ = "0.1.0"
