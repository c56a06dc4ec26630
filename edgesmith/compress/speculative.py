"""The ``speculate`` pass: measure speculative decoding of a decoder and keep it only if it pays.

Recipe step ``speculate: {draft: FOLDER, num_tokens: 4, min_speedup: 1.0}`` (or
``prompt_lookup: 3`` instead of a draft) after the steps that make the target (an ONNX decoder:
speculation is measured on the runtime it ships on, ONNX Runtime). It runs :func:`edgesmith.profiling.speculative.profile_speculative` on the
step's input: plain against speculative greedy decoding on the same runtime, the net decode speedup
with its interval, acceptance, tokens per target call, identical output. The measurement goes into
the step's report (the run's manifest); the output is the input with ``meta["speculative"]``
saying how to decode it (draft, k) and what that was measured to gain. When speculation does not
pay (``min_speedup`` not reached, a slowdown not excluded, or the output changed) the step fails
the run with one line (exit 3) and nothing after it runs.

The draft is a path (a folder or anything ``edgesmith.load`` reads); a draft made by an earlier
step of the same recipe is not wired in (give its saved folder).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import GateFailed
from edgesmith.passes import Context, Pass, PassConfig

log = logging.getLogger(__name__)


class SpeculateConfig(PassConfig):
    """Which draft, how many tokens per round, how it is measured, and the speedup to reach."""

    draft: str | None = Field(None, description="a draft decoder with the target's tokenizer (folder)")
    prompt_lookup: int | None = Field(None, ge=1, description="n-gram prompt lookup with n-grams of up to N tokens")
    num_tokens: int = Field(4, ge=1, description="tokens drafted per target call")
    min_speedup: float | None = Field(1.0, gt=0, description="refuse below this net decode speedup (None: "
                                      "measure only)")
    task: Literal["summarise", "repeat", "continue"] = "summarise"
    prompts: int = Field(4, ge=1)
    sentences: int = Field(8, ge=1, description="corpus sentences per prompt's passage")
    new_tokens: int = Field(64, ge=2)
    rounds: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_draft(self) -> SpeculateConfig:
        if (self.draft is None) == (self.prompt_lookup is None):
            raise ValueError("give exactly one of draft (a folder) or prompt_lookup (an n-gram size)")
        return self


class SpeculatePass(Pass):
    """A decoder -> the same decoder with a measured speculative-decoding setting, or a refusal."""

    name = "speculate"
    config_class = SpeculateConfig
    accepts = (OnnxModel,)
    returns = OnnxModel
    description = "measure speculative decoding (draft model or prompt lookup) and keep it only if it pays"

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        from edgesmith.profiling.speculative import profile_speculative

        cfg: SpeculateConfig = self.config  # type: ignore[assignment]
        report = profile_speculative(artifact, draft=cfg.draft, prompt_lookup=cfg.prompt_lookup,
                                     num_tokens=cfg.num_tokens, task=cfg.task, count=cfg.prompts,
                                     sentences=cfg.sentences, new_tokens=cfg.new_tokens, rounds=cfg.rounds,
                                     threads=cfg.threads, min_speedup=cfg.min_speedup)
        ctx.report.update(report.model_dump())
        if report.passed is False:
            raise GateFailed(f"speculate: {report.reason}", failures=[{"gate": "speculate.min_speedup",
                                                                       "speedup": report.speedup}])
        out = artifact.derive()
        out.meta["speculative"] = {"draft": report.draft, "mode": report.mode, "num_tokens": report.num_tokens,
                                   "speedup": report.speedup, "acceptance_rate": report.acceptance_rate,
                                   "tokens_per_call": report.tokens_per_call, "identical": report.identical,
                                   "runtime": report.runtime, "passed": report.passed}
        return out
