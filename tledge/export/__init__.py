"""`tledge export`: ONNX, FP16 and INT8 graphs, and TensorRT engines."""
