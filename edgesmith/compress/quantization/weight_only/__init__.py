"""Weight-only INT4/INT8 quantization of ONNX graphs (decoders first) with ONNX Runtime's
``MatMulNBitsQuantizer``, and an accuracy-aware mode bounded by KL divergence.

Decoding is memory-bound: every token reads every weight once, so 4-bit weights are what makes a
small LM fast on a CPU (SmolLM2-135M: PyTorch FP32 13-14 tokens/s, llama.cpp Q4_1 100-119, ORT
GenAI's INT4 103-109; FIELD-NOTES § Decoders). Each MatMul with a constant 2-D weight becomes a
``MatMulNBits`` (block-wise along K, one scale, and zero point unless symmetric, per block);
activations stay float and ``accuracy_level`` 4 lets the CPU kernel quantize them to int8 per
block (2.9x faster than level 0 at M = 1 on our CPU).

Methods, all ORT's own: ``rtn`` (``DefaultWeightOnlyQuantConfig``, round to nearest, C++),
``hqq`` (half-quadratic, no data; float zero points), ``gptq`` (second-order, calibrated on
corpus passages in the decoder layout; 4 bits only in ORT), and ``k-quant`` (llama.cpp-style scale
search, when the installed ORT has ``KQuantWeightOnlyQuantConfig``), one table (:mod:`.methods`);
and ``gguf``, not an algorithm but a source of ready blocks (:mod:`.sources`). The tied LM head (the widest
MatMul: 49,152 x 576 in SmolLM2) is quantized or kept float by ``quantize_lm_head``; the embedding
table (a Gather) becomes a 4-bit ``GatherBlockQuantized`` with ``quantize_embedding``.

Small models suffer most from 4 bits (GPTQ paper: OPT-125M perplexity 27.7 -> 37.3 with RTN), so
``max_kld`` turns on the search: the graph is quantized once per precision (main method, and
8-bit RTN for the fallback), and candidate graphs are composed node by node from those copies
(ORT's GPTQ measures each MatMul's inputs on the float graph, so a node's quantized weight does
not depend on which others are quantized). Layer groups (all MatMuls of one decoder layer, the
LM head alone) are ranked by the KL divergence each costs when it alone is quantized, on probe
passages from the calibration side of the corpus; the most sensitive go to the fallback precision
until the KL on the held-out passages (:mod:`edgesmith.lm_quality`) is within the budget. If even
every group at the fallback misses it, :class:`GateFailed` (exit 3): the budget is a quality gate
that cannot hold, not a malformed input.

Measured on SmolLM2-135M-Instruct (the FP32 model transformers dequantizes from the packaged Q4_1
GGUF; 540 held-out tokens; KL/top-1 against the FP32 ONNX parent; 2 shared cores; block 32,
accuracy level 4; sizes include the 113 MB float embedding table unless repacked):

==========================  ==========  ======  =====  ==========  =======
variant                     quantize s  KL      top-1  perplexity  size MB
==========================  ==========  ======  =====  ==========  =======
FP32 parent                 -           0       1      159.0       653
rtn int4 (asym)             11          0.466   0.585  215.8       201
rtn int4, symmetric         3           0.440   0.563  203.9       199
rtn int4, LM head float     6           0.372   0.644  198.6       296
hqq int4                    119         0.094   0.717  180.4       216
k-quant int4                116         0.494   0.543  217.0       201
gptq int4 (8 x 128 tokens)  1369        0.468   0.596  217.2       201
rtn int8                    10          0.0053  0.943  158.9       270
gguf repack (exact)         8           0.0186  0.898  158.5       147
gguf repack, level 0        7           <1e-5   1.000  159.0       147
==========================  ==========  ======  =====  ==========  =======

Re-quantizing weights that are already on a 4-bit grid adds a second rounding: every
re-quantizer costs far more than the repack, whose only loss is level 4's int8 activations.
ORT's C++ RTN widens each block's range to include 0; its GPTQ (which re-rounds GPTQ's output
with a fresh min/max) lands where RTN does, at 100x the time; HQQ is the most faithful
re-quantizer but writes float zero points, which take MatMulNBits' slow CPU kernel (a one-token
forward of SmolLM2 took over 1 s against tens of ms for the others), so it is not a decode format.

The package: :mod:`.config` (the options), :mod:`.methods` (the algorithm table, ORT configs),
:mod:`.sources` (ready blocks from a file), :mod:`.ort` (ORT's quantizer, run quietly),
:mod:`.candidates` (which weights), :mod:`.compose` (graphs from quantized copies, node by node),
:mod:`.search` (the accuracy-aware search), :mod:`.passages` (corpus slices), :mod:`.quantize`
(the entry point). Graph-generic edits are :mod:`edgesmith.onnx_graph.edit` and
:mod:`edgesmith.onnx_graph.lm_head`.
"""

from __future__ import annotations

from edgesmith.compress.quantization.weight_only.config import WeightOnlyConfig
from edgesmith.compress.quantization.weight_only.methods import ALGORITHMS, METHODS, kquant_available, ort_quantize
from edgesmith.compress.quantization.weight_only.quantize import quantize_weight_only
from edgesmith.compress.quantization.weight_only.sources import SOURCES

__all__ = ["ALGORITHMS", "METHODS", "SOURCES", "WeightOnlyConfig", "kquant_available", "ort_quantize",
           "quantize_weight_only"]
