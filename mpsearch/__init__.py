"""mpsearch: mixed-precision bit-allocation search for PyTorch."""
