"""ctypes CUDA (see tledge/deploy/tledge_runtime/cuda.py, shared with the torch-free deploy runtime)."""
from tledge.deploy.tledge_runtime.cuda import (CudaError, DeviceBuffer, Stream, available, device_info,  # noqa: F401
                                               l4t_release)
