"""Corpus passages for weight-only quantization: GPTQ's calibration data and the search's probes.

Both slices lie before :data:`edgesmith.lm_quality.HELDOUT_START`, so nothing the quantizer saw is
scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgesmith.artifacts import OnnxModel

#: corpus offsets (both before lm_quality.HELDOUT_START): GPTQ calibration, sensitivity probes
CALIBRATION_OFFSET = 0
PROBE_OFFSET = 20_000


def calibration_feeds(parent: OnnxModel, graph, cfg: Any) -> list[dict[str, np.ndarray]]:
    """GPTQ's calibration data: ``cfg.calibration_passages`` corpus passages of ``cfg.calibration_tokens``
    tokens (before the held-out slice), one per run, fed in the decoder layout with an empty cache."""
    from edgesmith.lm_quality import calibration_batches, decoder_inputs_from_graph

    spec = decoder_inputs_from_graph(graph, parent.meta, where=str(parent.path))
    batches = calibration_batches(parent.tokenizer, count=cfg.calibration_passages, tokens=cfg.calibration_tokens,
                                  batch_size=1, offset=CALIBRATION_OFFSET)
    return [spec.feeds(b.input_ids, b.attention_mask) for b in batches]
