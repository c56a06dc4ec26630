"""Early exit: exit heads on a transformer's intermediate layers, a calibrated exit policy, and the
network cut into ONNX segments that a controller runs until a sample may leave.

- :mod:`~edgesmith.early_exit.network` (L1, pure torch): the backbone's layers and the exit heads.
- :mod:`~edgesmith.early_exit.policy` (L1, pure numpy): exit policies, quality tables, threshold calibration.
- :mod:`~edgesmith.early_exit.runtime` (L2): the controller sessions for ONNX Runtime and torch.
- :mod:`~edgesmith.early_exit.objective` (L4): self-distillation of the exit heads, exit outputs.
- :mod:`~edgesmith.early_exit.segments` (L4): export of the ONNX segments and their validation.
- :mod:`~edgesmith.early_exit.passes` (L4): the ``early-exit`` and ``quantize-segments`` passes.
"""
