"""The versioned Profile document and its parts, with loading and saving.

A profile records what was measured (the artifact's hash, kind and size), how (runtime, the
providers the session really ran on, its options, threads, shapes, warm-up), where (target and
an environment fingerprint) and every raw per-iteration latency, so that statistics can be
recomputed and two profiles compared with a bootstrap confidence interval instead of a guess.

Schema versions (every older version still loads):

- 1: latency profiles of one forward pass (kinds "measured" and "estimate").
- 2: adds the kind "generation" for decoders, with its ``generation`` part (time to first token per
  prompt length, prefill and decode tokens/s, load time, peak RSS). A version-1 file is a valid
  version-2 file without that part; the version moved so that an older edgesmith refuses a
  generation profile with one line ("written by a newer edgesmith") instead of a validation error.
- 3: adds ``generation.batched`` (a static batch of mixed-length prompts: ``--batch 1,2,4,8``, one
  profile per batch size). A version-2 file is a valid version-3 file without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from edgesmith.errors import BadInput
from edgesmith.profiling.environment import Environment
from edgesmith.schema import StrictModel
from edgesmith.storage import write_json_atomic

PROFILE_SCHEMA_VERSION = 3
ProfileKind = Literal["measured", "estimate", "generation"]


class ArtifactInfo(StrictModel):
    name: str
    kind: str
    hash: str
    size_bytes: int = Field(description="bytes on disk; for a TorchModel, the bytes of its parameters and buffers")
    task: str


class RuntimeInfo(StrictModel):
    name: str
    providers: list[str] = Field(description="the providers the session really ran on, read back from it")
    options: dict[str, Any] = Field(default_factory=dict)


class Shapes(StrictModel):
    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


class Stats(StrictModel):
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    n: int


class OpTime(StrictModel):
    """Mean time of one graph node (ONNX Runtime) or engine layer (TensorRT) per run."""

    name: str
    op_type: str
    ms: float
    calls: int = 1
    provider: str | None = None


class RooflineEstimate(StrictModel):
    """How an estimate was made: work and weight bytes against a target's published peaks."""

    macs: int
    weight_bytes: int
    precision: str = Field(description="the precision whose peak was used")
    peak_ops_per_s: float
    memory_bandwidth_bytes_per_s: float
    compute_ms: float
    memory_ms: float
    bound: Literal["compute", "memory"]


class EarlyExitStats(StrictModel):
    """What an early-exit model did while profiled: samples per exit (layers executed), time per
    segment, and the latency the calibration's exit histogram predicts from those segment times."""

    exit_layers: list[int]
    histogram: dict[str, int] = Field(description="timed samples that left at each exit (key: layers executed)")
    samples: int
    mean_layers: float | None
    total_layers: int
    segment_runs: list[int] = Field(description="times each segment ran during the timed loop")
    segment_rows: list[int] = Field(description="rows each segment processed during the timed loop")
    segment_ms: list[float | None] = Field(description="mean ms per run of each segment (None: never ran)")
    expected_histogram: dict[str, int] = Field(default_factory=dict,
                                               description="the calibration's exit histogram (validation data)")
    expected_ms: float | None = Field(default=None, description=(
        "sum over segments of P(the segment runs) x its mean ms, P from the calibration histogram: "
        "1 - (1 - reach)^batch, reach = share of samples that get to the segment"))


class BatchedGeneration(StrictModel):
    """A static batch of prompts of different lengths, all arriving together (``edgesmith profile
    --batch 1,2,4,8``): every request waits for the whole batch's prefill, so each request's time to
    first token is the batch's (``GenerationStats.ttft_ms``); after it, every step gives each
    request one token, so each request's time per output token is the step's latency (the profile's
    ``latencies_ms``), and the aggregate decode throughput is ``GenerationStats.decode_tokens_per_s``
    (batch x steps / their time)."""

    row_prompt_tokens: list[int] = Field(description="each request's prompt length, in tokens (mixed lengths)")
    spread: float = Field(description="prompt lengths spread evenly over center x (1 - spread) .. center x (1 + "
                          "spread); center: the profile's decode_prompt_tokens")
    loop: str = Field(description="who ran the batch: edgesmith's loop (left padding, prefill then step) or the "
                      "session's own batched loop")
    time_per_output_token_ms: list[float] = Field(description="per round: each request's mean time per output "
                                                  "token after the first (decode time / decode steps)")


class GenerationStats(StrictModel):
    """What a generation profile measured besides the per-token decode latencies.

    Those latencies are the profile's ``latencies_ms`` (every timed decode step of every round, in
    order, ``decode_steps`` per round), so the generic statistics, reports and the bootstrap read
    them like any latency sample. Keys of the per-length maps are the prompt lengths as strings
    (JSON object keys).
    """

    prompt_tokens: list[int] = Field(description="prompt lengths timed for the time to first token, in tokens")
    new_tokens: int = Field(description="tokens generated after the decode prompt (the first counts in the TTFT)")
    decode_prompt_tokens: int = Field(description="the prompt length the decode steps follow (the first of "
                                      "prompt_tokens)")
    decode_steps: int = Field(description="timed decode steps per round: new_tokens - 1")
    batch: int
    rounds: int
    ttft_ms: dict[str, list[float]] = Field(description="per prompt length: the time to first token of each round "
                                            "(prefill plus choosing the first token), ms")
    prefill_tokens_per_s: dict[str, list[float]] = Field(description="per prompt length and round: batch x prompt "
                                                         "tokens / time to first token")
    decode_tokens_per_s: list[float] = Field(description="per round: batch x decode_steps / their summed time")
    load_s: float = Field(description="seconds to make the session (an ONNX Runtime session; for a TorchModel "
                          "already in memory only the wrapper)")
    peak_rss_mb: float | None = Field(default=None, description="peak resident memory of the process while loading "
                                      "and generating, MiB (see rss_source)")
    rss_source: str = Field(description="how peak_rss_mb was read: VmHWM reset before loading (Linux), "
                            "getrusage ru_maxrss (the process's lifetime peak) or psutil")
    prompt_source: Literal["tokenizer", "random ids"] = Field(description="prompts from the shipped corpus "
                                                              "through the tokenizer, or random ids in the vocabulary")
    greedy: bool = True
    eos_ignored: bool = True
    batched: BatchedGeneration | None = Field(default=None, description="a static batch of mixed-length prompts "
                                              "(schema 3); absent for equal-length rows")

    def ttft_of(self, prompt_tokens: int) -> list[float]:
        return self.ttft_ms.get(str(prompt_tokens), [])


class Profile(StrictModel):
    """One latency profile: an artifact on a runtime, on a target, at fixed shapes.

    ``kind`` is "measured" for timed runs and "estimate" for a roofline estimate (then
    ``latencies_ms`` holds the single estimated latency and ``estimate`` says how it was made).
    "generation" is a decoder's profile: ``latencies_ms`` holds the raw per-token decode latencies,
    ``stats`` summarises them, ``throughput`` is decode tokens/s (median over rounds), ``shapes`` is
    batch x the decode prompt's length, and ``generation`` holds the rest (TTFT per prompt length).
    """

    schema_version: int = PROFILE_SCHEMA_VERSION
    kind: ProfileKind = "measured"
    label: str
    artifact: ArtifactInfo
    runtime: RuntimeInfo
    target: str = "cpu-local"
    environment: Environment
    shapes: Shapes
    warmup: int
    iterations: int = Field(description="timed iterations asked for; stats.n says how many ran")
    time_budget_s: float | None = None
    latencies_ms: list[float] = Field(description="raw wall-clock latency of every timed iteration")
    stats: Stats
    throughput: float = Field(description="samples per second: batch / median latency")
    peak_host_memory_mb: float | None = Field(
        default=None, description="peak resident memory of the whole profiling process (VmHWM), not of the model alone")
    peak_device_memory_mb: float | None = None
    quality: dict[str, float] = Field(default_factory=dict)
    per_op: list[OpTime] | None = Field(default=None, description="per-op (or per-layer) mean ms per run, "
                                        "from a separate profiler session; absent when not asked for")
    estimate: RooflineEstimate | None = None
    early_exit: EarlyExitStats | None = Field(default=None, description="exit histogram and per-segment latency "
                                              "of an early-exit model; absent for other models")
    generation: GenerationStats | None = Field(default=None, description="a decoder's generation measurements "
                                               "(kind generation); absent for other profiles")
    created: str

    @model_validator(mode="after")
    def _generation_part(self) -> Profile:
        if (self.kind == "generation") != (self.generation is not None):
            raise ValueError("a generation profile (kind generation) and only such a profile has a generation part")
        return self

    @property
    def is_generation(self) -> bool:
        return self.kind == "generation"

    @property
    def is_estimate(self) -> bool:
        return self.kind == "estimate"

    @property
    def provider(self) -> str:
        """The provider the session ran on first (the one that matters)."""
        return self.runtime.providers[0] if self.runtime.providers else "unknown"

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON, atomically (a temp file renamed into place)."""
        path = Path(path)
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile; a missing, corrupt or foreign file is a :class:`BadInput` naming it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise BadInput(f"profile {path} not found; record one with `edgesmith profile MODEL --out {path}`") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"profile {path}: cannot read it ({exc}); give a profile JSON file") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"profile {path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                           "the file is damaged, record the profile again") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "profile") -> Profile:
        if not isinstance(data, dict) or "schema_version" not in data:
            raise BadInput(f"{source}: not an edgesmith profile (no schema_version); give a file written by `edgesmith profile`")
        version = data["schema_version"]
        if not isinstance(version, int):
            raise BadInput(f"{source}: schema_version {version!r} is not a number; the file is damaged")
        if version > PROFILE_SCHEMA_VERSION:
            raise BadInput(f"{source}: written by a newer edgesmith (profile schema {version}, this one reads "
                           f"{PROFILE_SCHEMA_VERSION}); upgrade edgesmith")
        if version < 1:
            raise BadInput(f"{source}: unknown profile schema {version}; record the profile again")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise BadInput(f"{source}: not a valid profile ({exc.error_count()} problem(s); first: {where}: "
                           f"{first['msg']}); record the profile again") from exc
