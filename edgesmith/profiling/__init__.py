"""Latency profiles: the versioned Profile document, measuring one, and comparing many.

The package, bottom up:

- :mod:`~edgesmith.profiling.agent`: the stdlib-only agent sent to a device over SSH (imports nothing of edgesmith)
- :mod:`~edgesmith.profiling.environment`: the environment fingerprint (CPU, OS, libraries, threads)
- :mod:`~edgesmith.profiling.schema`: the Profile document and its parts; load, save, schema versions
- :mod:`~edgesmith.profiling.measure`: ``profile`` and ``measure``: inputs, the timed loop, device memory, per-op
- :mod:`~edgesmith.profiling.generation`: ``profile_generation``: a decoder's TTFT per prompt length and decode tokens/s
- :mod:`~edgesmith.profiling.dispatch`: ``profile`` for any artifact: decoders as generation, the rest as one forward pass
- :mod:`~edgesmith.profiling.compare`: ``compare`` against a baseline, and its rich/Markdown rendering
- :mod:`~edgesmith.profiling.roofline`: an estimate from a graph's work and a target's published peaks
- :mod:`~edgesmith.profiling.ssh`: the connection to a device (system ``ssh``) and its one-line errors
- :mod:`~edgesmith.profiling.remote`: ``profile_remote``: copy the model and inputs, run the agent there

The statistics (``summarize``, ``bootstrap_speedup``, ``verdict_of``) live in :mod:`edgesmith.stats`, below
every layer; they are re-exported here with the rest, so ``from edgesmith.profiling import X`` works for
every public name of schema, measure and compare.
"""

from __future__ import annotations

from edgesmith.profiling.compare import (
    MIN_TTFT_SAMPLES,
    OP_DELTA_ROWS,
    Comparison,
    ComparisonRow,
    EarlyExitSummary,
    GenerationSummary,
    OpDelta,
    RatioCI,
    compare,
    generation_slowdowns,
    group_by_target,
    op_deltas,
)
from edgesmith.profiling.dispatch import profile
from edgesmith.profiling.generation import (
    DEFAULT_NEW_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    generation_profile,
    is_decoder,
    parse_prompt_tokens,
    profile_generation,
)
from edgesmith.profiling.measure import (
    EARLY_EXIT_INPUT_BATCHES,
    INPUT_BATCHES,
    MIN_SAMPLES,
    artifact_info,
    artifact_size_bytes,
    build_feeds,
    check_arguments,
    early_exit_stats,
    measure,
    measured_profile,
    peak_host_memory_mb,
)
from edgesmith.profiling.schema import (
    PROFILE_SCHEMA_VERSION,
    ArtifactInfo,
    EarlyExitStats,
    GenerationStats,
    OpTime,
    Profile,
    ProfileKind,
    RooflineEstimate,
    RuntimeInfo,
    Shapes,
    Stats,
)
from edgesmith.reports.comparison import COMPACT_DROPPABLE, COMPACT_HIDDEN, VERDICT_HEADER
from edgesmith.stats import CONFIDENCE, Verdict, bootstrap_speedup, summarize, verdict_of

__all__ = [
    # schema
    "PROFILE_SCHEMA_VERSION", "ProfileKind", "ArtifactInfo", "RuntimeInfo", "Shapes", "Stats",
    "OpTime", "RooflineEstimate", "EarlyExitStats", "GenerationStats", "Profile",
    # statistics (edgesmith.stats)
    "CONFIDENCE", "Verdict", "summarize", "bootstrap_speedup", "verdict_of",
    # measuring
    "MIN_SAMPLES", "INPUT_BATCHES", "EARLY_EXIT_INPUT_BATCHES", "artifact_size_bytes", "artifact_info",
    "build_feeds", "peak_host_memory_mb", "check_arguments", "measure", "profile", "measured_profile",
    "early_exit_stats",
    # generation (decoders)
    "DEFAULT_PROMPT_TOKENS", "DEFAULT_NEW_TOKENS", "is_decoder", "parse_prompt_tokens", "profile_generation",
    "generation_profile",
    # comparing and rendering
    "VERDICT_HEADER", "COMPACT_DROPPABLE", "COMPACT_HIDDEN", "OP_DELTA_ROWS", "OpDelta", "EarlyExitSummary",
    "ComparisonRow", "Comparison", "compare", "group_by_target", "op_deltas",
    "MIN_TTFT_SAMPLES", "RatioCI", "GenerationSummary", "generation_slowdowns",
]
