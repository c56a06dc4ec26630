"""Whether ONNX Runtime's CPU MatMulNBits is right for asymmetric 4-bit weights on this machine.

ONNX Runtime issue #29853 (open, 2026-07): the AVX2 kernel ``SQ4BitGemmM1Kernel_CompInt8_avx2``
returns wrong results (~46 % error) for **asymmetric** 4-bit MatMulNBits (a ``zero_points`` input)
at M = 1 — every decode step — on CPUs without AVX-512, at every block size; AVX-512 hosts and
M > 1 are right. Which kernel MLAS dispatches to is decided by the CPU at run time, so edgesmith
does not guess from the flags: :func:`asymmetric_int4_ok` runs one tiny asymmetric MatMulNBits at
M = 1 and accuracy level 4 (the int8 path) against numpy, once per process, and
:func:`check_asymmetric_int4` refuses (one line, exit 2) a graph with 4-bit zero points where the
probe is wrong, naming the way out: symmetric blocks (no zero points: ``symmetric: true``, or the
GGUF repack, which writes Q4_0 and Q4_1 as symmetric codes). Both decoder runtimes that run
MatMulNBits on the CPU (ONNX Runtime's session, ORT GenAI's) check when they load a graph.

Layer L2 (a runtime helper): imports onnx and onnxruntime only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgesmith.errors import BadInput

#: relative error above which the probe calls the kernel wrong (int8 activations alone: < 1 %)
TOLERANCE = 0.05
_K, _N, _BLOCK = 256, 64, 32


def _probe_graph(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # [N, blocks, 16]
    zp = zero_points.reshape(_N, -1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=_K, N=_N, bits=4, block_size=_BLOCK, accuracy_level=4)
    graph = helper.make_graph(
        [node], "mlas_probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, _K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, _N])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales"),
         numpy_helper.from_array(zp_packed, "zero_points")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@functools.cache
def asymmetric_int4_error() -> float:
    """Relative error of ONNX Runtime's CPU MatMulNBits (4 bits, uint8 zero points, M = 1,
    accuracy level 4) against numpy on random weights, measured once per process."""
    import onnxruntime as ort

    rng = np.random.default_rng(29853)
    blocks = _K // _BLOCK
    codes = rng.integers(0, 16, size=(_N, blocks, _BLOCK)).astype(np.uint8)
    zero_points = rng.integers(0, 16, size=(_N, blocks)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.05, size=(_N, blocks)).astype(np.float32)
    weight = ((codes.astype(np.float32) - zero_points[..., None]) * scales[..., None]).reshape(_N, _K)
    a = rng.standard_normal((1, _K)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(_probe_graph(codes, scales, zero_points).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"A": a})[0]
    want = a @ weight.T
    return float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12))


def asymmetric_int4_ok() -> bool:
    return asymmetric_int4_error() <= TOLERANCE


def has_asymmetric_int4(path: str | Path) -> bool:
    """Whether the graph at ``path`` has a 4-bit MatMulNBits with a zero-points input."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        if bits == 4 and len(node.input) > 3 and node.input[3]:
            return True
    return False


def check_asymmetric_int4(path: str | Path, *, provider: str = "cpu") -> None:
    """One line (exit 2) when ``path`` has asymmetric 4-bit weights and this CPU's MLAS kernel
    computes them wrong; nothing on other providers or where the probe is right."""
    # the probe runs once per process; the graph (a quantized one holds its weights inline: ~130 MB for
    # SmolLM2) is read only where the kernel is wrong
    if provider != "cpu" or asymmetric_int4_ok() or not has_asymmetric_int4(path):
        return
    raise BadInput(f"{path}: asymmetric 4-bit MatMulNBits (zero points) computes wrong results on this CPU "
                   f"(relative error {asymmetric_int4_error():.2f} at one token; ONNX Runtime issue #29853, "
                   "AVX2 without AVX-512); quantize with symmetric blocks (weight-only option symmetric: true, "
                   "or method gguf) to run it here")
