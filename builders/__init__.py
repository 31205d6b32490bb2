"""Builders: ONNX export of the real architectures, precision preparation, TensorRT engines."""
