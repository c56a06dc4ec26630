"""Per-op times of an ONNX model from ONNX Runtime's own profiler (``enable_profiling``).

The trace is recorded in sessions of their own (the profiler slows what it records, so never in a
timed loop) and parsed by the device agent's stdlib parser, so a profile made here and one made on
a device over ssh read the same events the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput
from edgesmith.profiling.agent import per_op_from_trace


def ort_per_op(artifact: Artifact, options: dict[str, Any], feeds: list[dict[str, np.ndarray]],
               runs: int) -> list[dict[str, Any]]:
    """Per-op mean times over ``runs`` runs (op type, node, ms per run), parsed from ONNX Runtime's trace."""
    from edgesmith.runtimes.base import get_runtime

    if runs < 1:
        raise BadInput(f"per-op runs must be at least 1 (got {runs})")
    with tempfile.TemporaryDirectory(prefix="edgesmith-ortprof-") as folder:
        # the trace goes into the temp folder (profile_file_prefix), never the process's working directory
        prefix = os.path.join(folder, "trace")
        events = []
        for n in (1, runs):  # a first session absorbs first-run allocations; the second is recorded
            session = get_runtime("onnxruntime").load(artifact, **{**options, "enable_profiling": True,
                                                                   "profile_file_prefix": prefix})
            for i in range(n):
                session.run(feeds[i % len(feeds)])
            trace = session.end_profiling()
            session.close()
            events = json.loads(Path(trace).read_text(encoding="utf-8"))
    return per_op_from_trace(events, runs)
