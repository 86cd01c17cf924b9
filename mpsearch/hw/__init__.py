"""Hardware cost: measured kernel latencies, profiles, ONNX export with real kernels.

- :func:`profile` measures each distinct layer shape in every format with a real kernel
  (:mod:`~mpsearch.hw.kernels_ort`: ONNX Runtime on CPU; :mod:`~mpsearch.hw.kernels_torch`:
  PyTorch on CUDA, or on CPU as a second backend);
- :class:`HardwareProfile` holds the measurements (JSON in ``hw_profiles/``);
- :func:`export_onnx` builds the mixed-precision model on those same kernels;
- :mod:`~mpsearch.hw.cost` turns a profile into the ``latency_us`` cost table.

onnxruntime and onnx are imported only when a kernel is built or run.
"""

from mpsearch.hw.onnx_export import export_onnx
from mpsearch.hw.profile import profile
from mpsearch.hw.profile_data import HardwareProfile

__all__ = ["HardwareProfile", "export_onnx", "profile"]
