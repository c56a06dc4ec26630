"""Speculative decoding, measured: plain greedy against speculative decoding of the same target on
the same runtime, on input-grounded prompts, in rotating rounds; the net decode speedup with a
bootstrap interval, acceptance, tokens per target call, and a token-for-token identity check.

What is timed is what a user gets: plain decoding is :func:`edgesmith.runtimes.generation.decode_loop`
(the loop behind ``generate``); speculative decoding is
:func:`edgesmith.runtimes.speculative.speculative_loop`, whose decode time includes everything the
draft costs (its own prefill of the prompt, its steps, the cache rollbacks). Both stop at the
target's EOS (``ignore_eos`` forces the length), so they produce the same tokens when the output is
identical. The time to first token is the target's prefill in both and is left out of the decode
speed; the end-to-end ratio is reported beside it.

Prompts are *input-grounded* (the task speculative decoding is for): a passage of the shipped corpus
with an instruction to summarise it, or to repeat / continue it, through the chat template when the
tokenizer has one. Each (round, prompt) pair runs both contenders back to back, the order alternating
by round, so drift of a shared machine hits both sides of a pair's ratio; the speedup is the median of
the pairs' ratios, and its interval the percentile bootstrap of that median.

The gate (:func:`check_speedup`): speculation is kept only when the output is identical on every
prompt, the point speedup reaches ``min_speedup`` and the interval's low end lies above 1.0 (a
slowdown within the noise is not shipped either). Otherwise :class:`~edgesmith.errors.GateFailed`,
exit 3, with the measured numbers in one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput, GateFailed
from edgesmith.schema import StrictModel
from edgesmith.stats import median_ci

log = logging.getLogger(__name__)

Task = Literal["summarise", "repeat", "continue"]
INSTRUCTIONS: dict[str, str] = {
    "summarise": "Summarise the following text in a few sentences, reusing its wording.\n\n{passage}",
    "repeat": "Repeat the following text exactly.\n\n{passage}",
    "continue": "{passage}",
}
DEFAULT_PROMPTS = 4
DEFAULT_PASSAGE_SENTENCES = 8
DEFAULT_NEW_TOKENS = 64
DEFAULT_ROUNDS = 3
#: the corpus rows prompts are cut from: past the calibration rows the recipes use
CORPUS_OFFSET = 20_000


class SpeculativeReport(StrictModel):
    """A measured comparison of plain and speculative greedy decoding of one target."""

    target: str
    draft: str = Field(description="the draft model's name, or prompt-lookup-N")
    mode: Literal["draft-model", "prompt-lookup"]
    num_tokens: int = Field(description="tokens drafted per round (k)")
    runtime: str
    providers: list[str]
    threads: int | None
    task: str
    prompts: int
    prompt_tokens: list[int] = Field(description="each prompt's length in tokens")
    new_tokens: int = Field(description="most tokens generated per prompt")
    ignore_eos: bool
    rounds: int
    generated_tokens: list[int] = Field(description="tokens each prompt generated (plain greedy)")
    plain_tokens_per_s: float = Field(description="median decode tokens/s of plain greedy (after the first token)")
    speculative_tokens_per_s: float = Field(description="median decode tokens/s with speculation, draft included")
    speedup: list[float] = Field(description="net decode speedup [median, low, high]: speculative / plain tokens/s "
                                 "per (round, prompt) pair, 95% bootstrap interval")
    end_to_end_speedup: list[float] = Field(description="the same with the time to first token included")
    pair_speedups: list[list[float]] = Field(default_factory=list, description="raw samples: each prompt's net "
                                             "decode speedup, one per round")
    acceptance_rate: float | None = Field(description="accepted / drafted tokens over every speculative run")
    tokens_per_call: float | None = Field(description="tokens after the first per target call (plain: 1.0)")
    target_calls: int = Field(description="target calls of one pass over the prompts (plain: generated - prompts)")
    draft_share: float = Field(description="share of the speculative decode time spent drafting")
    draft_ms_per_call: float
    verify_ms_per_call: float
    identical: bool = Field(description="the speculative output equals plain greedy token for token on every prompt")
    mismatches: list[int] = Field(default_factory=list, description="prompts whose output differed")
    load_average: list[float] = Field(description="1-minute load average at the start and at the end")
    min_speedup: float | None = None
    passed: bool | None = None
    reason: str | None = None
    created: str


def grounded_prompts(count: int = DEFAULT_PROMPTS, *, task: Task = "summarise",
                     sentences: int = DEFAULT_PASSAGE_SENTENCES, texts: Sequence[str] | None = None) -> list[str]:
    """``count`` prompts, each a passage of ``sentences`` corpus sentences under the task's instruction."""
    from edgesmith.data import builtin_corpus

    if task not in INSTRUCTIONS:
        raise BadInput(f"task '{task}' is unknown; use one of {', '.join(INSTRUCTIONS)}")
    if count < 1 or sentences < 1:
        raise BadInput(f"prompts and passage sentences must be at least 1 (got {count}, {sentences})")
    pool = [t for t in (texts if texts is not None else
                        builtin_corpus(limit=count * sentences, offset=CORPUS_OFFSET)) if t]
    if not pool:
        raise BadInput("no texts to build prompts from; give non-empty texts")
    prompts = []
    for i in range(count):
        chosen = [pool[(i * sentences + j) % len(pool)].strip().rstrip(".") + "." for j in range(sentences)]
        prompts.append(INSTRUCTIONS[task].format(passage=" ".join(chosen)))
    return prompts


def paired_interval(ratios: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> list[float]:
    """[median, low, high] of paired ratios, the interval a percentile bootstrap of the median
    (:func:`edgesmith.stats.median_ci`)."""
    if len(ratios) == 0:
        raise BadInput("no paired measurements to summarise")
    return list(median_ci(ratios, n_boot=n_boot, seed=seed, confidence=confidence))


def _load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - no load average (Windows)
        return float("nan")


def _checked_target(target: Artifact | str, *, rounds: int, warmup: int, new_tokens: int, num_tokens: int) -> Artifact:
    """The target artifact, after the arguments and the artifact are checked (one line each)."""
    from edgesmith.artifacts import load

    if rounds < 1 or warmup < 0 or new_tokens < 2:
        raise BadInput(f"rounds must be >= 1, warmup >= 0 and new tokens >= 2 (got {rounds}, {warmup}, {new_tokens})")
    if num_tokens < 1:
        raise BadInput(f"--num-tokens (tokens drafted per round) must be at least 1, got {num_tokens}")
    artifact = load(target) if isinstance(target, str) else target
    if artifact.task != "text-generation":
        raise BadInput(f"{artifact.name} is a {artifact.task} model; speculative decoding needs a causal LM")
    if artifact.tokenizer is None:
        raise BadInput(f"{artifact.name} has no tokenizer; save one beside the model to build prompts")
    return artifact


def _check_lengths(rows: list[list[int]], new_tokens: int, max_positions: int | None) -> None:
    if max_positions:
        too_long = [len(r) for r in rows if len(r) + new_tokens > int(max_positions)]
        if too_long:
            raise BadInput(f"a prompt of {too_long[0]} tokens + {new_tokens} new tokens exceeds the context of "
                           f"{max_positions}; lower --new-tokens or give shorter prompts")


def _paired_rounds(rows: list[list[int]], rounds: int, plain, speculative) -> dict[str, Any]:
    """Every prompt run plain and speculative in each round, the order alternating (neither side
    favoured by caches): the first round's tokens, the speeds, their ratios and the speculative runs."""
    out: dict[str, Any] = {"reference": [], "ratios": [], "e2e": [], "plain_speed": [], "spec_speed": [],
                           "per_prompt": [[] for _ in rows], "mismatches": set(), "spec_runs": []}
    for r in range(rounds):
        for i, ids in enumerate(rows):
            order = ("plain", "spec") if (r + i) % 2 == 0 else ("spec", "plain")
            result: dict[str, Any] = {}
            for name in order:
                result[name] = plain(ids) if name == "plain" else speculative(ids)
            tokens, plain_ms, ttft = result["plain"]
            run = result["spec"]
            if r == 0:
                out["reference"].append(tokens)
            if run.tokens != tokens:
                out["mismatches"].add(i)
            steps = len(tokens) - 1
            if steps < 1 or plain_ms <= 0 or run.decode_ms <= 0:
                continue
            out["plain_speed"].append(steps * 1000.0 / plain_ms)
            out["spec_speed"].append((len(run.tokens) - 1) * 1000.0 / run.decode_ms)
            out["ratios"].append(out["spec_speed"][-1] / out["plain_speed"][-1])
            out["per_prompt"][i].append(round(out["ratios"][-1], 4))
            out["e2e"].append((ttft + plain_ms) / (run.ttft_ms + run.decode_ms) * len(run.tokens) / len(tokens))
            out["spec_runs"].append(run)
    return out


def profile_speculative(target: Artifact | str, *, draft: Artifact | str | None = None,
                        prompt_lookup: int | None = None, num_tokens: int = 4, task: Task = "summarise",
                        prompts: Sequence[str] | None = None, count: int = DEFAULT_PROMPTS,
                        sentences: int = DEFAULT_PASSAGE_SENTENCES,
                        new_tokens: int = DEFAULT_NEW_TOKENS, rounds: int = DEFAULT_ROUNDS, warmup: int = 1,
                        threads: int | None = None, ignore_eos: bool = False, chat: bool | None = None,
                        min_speedup: float | None = None) -> SpeculativeReport:
    """Measure plain against speculative greedy decoding of ``target`` (see the module's docstring).
    ``draft`` (a decoder with the target's tokenizer) or ``prompt_lookup`` (longest n-gram) names the
    drafter. With ``min_speedup`` the report carries the gate's verdict (:func:`check_speedup` raises)."""
    from edgesmith.runtimes.generation import GenerationConfig, decode_loop, load_decoder, prompt_ids, stop_ids_for
    from edgesmith.runtimes.speculative import make_drafter, speculative_loop

    artifact = _checked_target(target, rounds=rounds, warmup=warmup, new_tokens=new_tokens, num_tokens=num_tokens)
    tokenizer = artifact.tokenizer
    texts = list(prompts) if prompts is not None else grounded_prompts(count, task=task, sentences=sentences)
    load_start = _load_average()
    session = load_decoder(artifact, threads=threads)
    drafter = None
    try:
        drafter = make_drafter(session, draft=draft, prompt_lookup=prompt_lookup, target_tokenizer=tokenizer,
                               threads=threads)
        rows = [prompt_ids(tokenizer, t, chat=chat) for t in texts]
        _check_lengths(rows, new_tokens, session.max_positions)
        cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=ignore_eos)
        stops = stop_ids_for(session, tokenizer, cfg)

        def plain(ids: list[int]) -> tuple[list[int], float, float]:
            run = decode_loop(session, np.asarray([ids], dtype=np.int64), None, cfg, stop_ids=stops)
            session.reset()
            return run.tokens[0, :run.lengths[0]].tolist(), sum(run.latencies_ms), run.ttft_ms

        def speculative(ids: list[int]):
            run = speculative_loop(session, drafter, ids, max_new_tokens=new_tokens, num_tokens=num_tokens,
                                   stop_ids=stops, ignore_eos=ignore_eos)
            session.reset()
            return run

        for _ in range(warmup):
            plain(rows[0])
            speculative(rows[0])
        pairs = _paired_rounds(rows, rounds, plain, speculative)
        reference, ratios, e2e = pairs["reference"], pairs["ratios"], pairs["e2e"]
        plain_speed, spec_speed, spec_runs = pairs["plain_speed"], pairs["spec_speed"], pairs["spec_runs"]
        per_prompt, mismatches = pairs["per_prompt"], pairs["mismatches"]
        if not ratios:
            raise BadInput("every prompt stopped after its first token; nothing to time (use --ignore-eos or other "
                           "prompts)")
        providers = list(session.providers)
        used_threads = (session.options or {}).get("threads", threads)
        runtime = session.runtime
    finally:
        if drafter is not None:
            drafter.close()
        session.close()
    drafted = sum(x.drafted for x in spec_runs)
    calls = sum(x.target_calls for x in spec_runs)
    draft_ms = sum(x.draft_ms for x in spec_runs)
    verify_ms = sum(x.verify_ms for x in spec_runs)
    per_pass = spec_runs[:len(rows)]
    report = SpeculativeReport(
        target=artifact.name, draft=drafter.name, mode="prompt-lookup" if prompt_lookup is not None else "draft-model",
        num_tokens=num_tokens, runtime=runtime, providers=providers,
        threads=int(used_threads) if used_threads else None, task=task if prompts is None else "given prompts",
        prompts=len(rows), prompt_tokens=[len(r) for r in rows], new_tokens=new_tokens, ignore_eos=ignore_eos,
        rounds=rounds, generated_tokens=[len(t) for t in reference],
        plain_tokens_per_s=float(np.median(plain_speed)), speculative_tokens_per_s=float(np.median(spec_speed)),
        speedup=paired_interval(ratios), end_to_end_speedup=paired_interval(e2e), pair_speedups=per_prompt,
        acceptance_rate=sum(x.accepted for x in spec_runs) / drafted if drafted else None,
        tokens_per_call=sum(len(x.tokens) - 1 for x in spec_runs) / calls if calls else None,
        target_calls=sum(x.target_calls for x in per_pass),
        draft_share=draft_ms / (draft_ms + verify_ms) if draft_ms + verify_ms > 0 else 0.0,
        draft_ms_per_call=draft_ms / calls if calls else 0.0, verify_ms_per_call=verify_ms / calls if calls else 0.0,
        identical=not mismatches, mismatches=sorted(mismatches), load_average=[load_start, _load_average()],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return _gated(report, min_speedup)


def _gated(report: SpeculativeReport, min_speedup: float | None) -> SpeculativeReport:
    """The report with the gate's verdict when ``min_speedup`` is given; logged."""
    if min_speedup is not None:
        report.min_speedup = float(min_speedup)
        report.reason = refusal(report, min_speedup)
        report.passed = report.reason is None
    log.info("%s with %s: net speedup %.2fx [%.2f, %.2f], acceptance %s, %.2f tokens/call", report.target,
             report.draft, *report.speedup, report.acceptance_rate, report.tokens_per_call or 0.0)
    return report


def refusal(report: SpeculativeReport, min_speedup: float) -> str | None:
    """Why speculation must not be shipped (one line), or None when it pays."""
    point, low, high = report.speedup
    measured = (f"net decode speedup {point:.2f}x [95% CI {low:.2f}-{high:.2f}] with {report.draft} "
                f"(k={report.num_tokens}, acceptance {_pct(report.acceptance_rate)}, "
                f"{report.tokens_per_call or 0:.2f} tokens/call)")
    if not report.identical:
        return (f"speculative output differs from plain greedy on prompt(s) {report.mismatches}; {measured}: refusing "
                "(the target's greedy output must not change)")
    if point < min_speedup:
        return f"{measured} is below --min-speedup {min_speedup:.2f}: refusing to ship a speculation that does not pay"
    if low <= 1.0:
        return f"{measured}: the interval reaches 1.0 (a slowdown is not excluded); refusing (more rounds may settle it)"
    return None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def check_speedup(report: SpeculativeReport, min_speedup: float) -> None:
    """Raise GateFailed (exit 3, one line with the measurement) unless speculation pays."""
    reason = refusal(report, min_speedup)
    if reason is not None:
        raise GateFailed(reason, failures=[{"gate": "speculative.min_speedup", "threshold": min_speedup,
                                            "speedup": report.speedup, "identical": report.identical}])
