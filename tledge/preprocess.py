"""Image loading and preprocessing (see tledge/deploy/tledge_runtime/preprocess.py).

The one definition lives in the deploy runtime package, which needs only numpy and Pillow and is copied
verbatim into every bundle, so training, calibration, benchmarking and the Jetson compute the same
input tensor. This module re-exports it for the rest of tledge.
"""
from tledge.deploy.tledge_runtime.preprocess import (ALPHA_BACKGROUND, DEFAULT_RESIZE_MODE,  # noqa: F401
                                                     INPUT_DTYPES, INPUT_KINDS, RESIZE_MODES, ImageLoadError,
                                                     Preprocess, decode_image, letterbox_geometry, load_image,
                                                     oddity, to_rgb)
