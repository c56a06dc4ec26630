"""TensorRT: engines built from ONNX models, run natively, through ONNX Runtime's execution
provider, or with trtexec on a device.

- :mod:`~edgesmith.tensorrt.precision` (L1): weak vs strong typing, precision flags, fp16/bf16 graphs.
- :mod:`~edgesmith.tensorrt.runtime` (L2): device identity, the engine session and runtime.
- :mod:`~edgesmith.tensorrt.options` (L4): the pass's options, precisions, tolerances and graph checks.
- :mod:`~edgesmith.tensorrt.backends` (L4): building with the Python builder API or with trtexec.
- :mod:`~edgesmith.tensorrt.build` (L4): the engine cache and metadata, the ``tensorrt`` pass.
"""
