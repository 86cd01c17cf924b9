"""Hardware cost: measured kernel latencies, profiles, ONNX export with real kernels."""
