"""TVM as an LSTM compiler: a Relax converter for ONNX LSTM and the compile step (imports tvm)."""
