"""One `profile` entry point for every artifact, so the Python API is the same for encoders and decoders.

A causal LM (task text-generation) is profiled as generation (:mod:`~edgesmith.profiling.generation`:
time to first token per prompt length, decode tokens/s); every other artifact as one forward pass at
fixed shapes (:mod:`~edgesmith.profiling.measure`). Options that belong to the other kind are refused
with one line instead of being ignored: a ``seq`` given to a decoder, or ``new_tokens`` to an encoder,
would otherwise leave a profile that silently measured something else than asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput
from edgesmith.profiling import batched, generation, measure
from edgesmith.profiling.schema import Profile

#: one-forward-pass options a generation profile has no use for
_FORWARD_ONLY = ("seq", "iterations", "time_budget_s", "per_op", "per_op_runs")


def profile(artifact: Artifact, runtime: str | None = None, *, prompt_tokens: Sequence[int] | str | None = None,
            new_tokens: int | None = None, rounds: int | None = None, warmup: int | None = None,
            provider: str | None = None, **options: Any) -> Profile | list[Profile]:
    """Profile ``artifact`` on ``runtime`` (default: the one its kind runs on).

    A decoder: :func:`~edgesmith.profiling.generation.profile_generation` with ``prompt_tokens``
    (default 128, 512), ``new_tokens`` (128), ``rounds`` (3) and ``warmup`` rounds (1). Anything else:
    :func:`~edgesmith.profiling.measure.profile` (``batch``, ``seq``, ``warmup`` iterations (5),
    ``iterations``, ...). ``batch``, ``threads``, ``label``, ``texts``, ``target`` and ``progress``
    apply to both. A decoder's ``batch`` may be a list of sizes (or "1,2,4,8"): one profile per size,
    of static batches of mixed-length prompts (:func:`~edgesmith.profiling.batched.profile_batched`),
    returned as a list."""
    if generation.is_decoder(artifact):
        given = [k for k in _FORWARD_ONLY if options.get(k) not in (None, False)]
        if given:
            raise BadInput(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to one-forward-pass profiles; "
                           f"{artifact.name} is a decoder: give prompt_tokens, new_tokens and rounds instead")
        kwargs = {k: v for k, v in options.items() if k not in _FORWARD_ONLY}
        for key, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("rounds", rounds),
                           ("warmup", warmup)):
            if value is not None:
                kwargs[key] = value
        if provider not in (None, "cpu"):  # the CPU is every decoder session's default
            kwargs["provider"] = provider
        if batched.is_batch_list(kwargs.get("batch")):
            return batched.profile_batched(artifact, runtime, **kwargs)
        return generation.profile_generation(artifact, runtime, **kwargs)
    given = [k for k, v in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("rounds", rounds))
             if v is not None]
    if given:
        raise BadInput(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to decoders (text-generation); "
                       f"{artifact.name} is a {artifact.task} model: give batch and seq instead")
    if batched.is_batch_list(options.get("batch")):
        raise BadInput(f"a list of batch sizes ({options['batch']}) applies to decoders (text-generation); "
                       f"{artifact.name} is a {artifact.task} model: give one batch size")
    if warmup is not None:
        options["warmup"] = warmup
    if provider is not None:
        options["provider"] = provider
    return measure.profile(artifact, runtime, **options)
