"""edgesmith's model for lm-evaluation-harness: any decoder artifact, scored on its own runtime.

:class:`EdgesmithLM` is an lm-eval ``TemplateLM`` over a decoder session
(:func:`edgesmith.runtimes.generation.open_decoder`: PyTorch, ONNX Runtime, or llama.cpp running
the GGUF as it is). lm-eval tokenizes and builds the requests; the session scores them
(:class:`~edgesmith.tasks.scoring.SessionScorer`): ``loglikelihood`` (context grouping, batched
single-token choices, the context's KV cache reused for longer ones), ``loglikelihood_rolling``
(lm-eval's disjoint rolling windows, as its Hugging Face backend) and ``generate_until`` (greedy
decoding on the session, stopped at the task's ``until`` strings or EOS).

lm-eval is an optional dependency (``pip install edgesmith[tasks]``): this module imports it at
the top, so import it only through :func:`edgesmith.tasks.harness.require_lm_eval`.

Tokenization follows lm-eval's Hugging Face backend with one difference: special tokens are not
added unless ``add_bos_token=True`` (the HF backend uses the tokenizer's default), so a GGUF's own
tokenizer and the source model's Hugging Face tokenizer give the same ids for the same text.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput
from edgesmith.runtimes.decoder import DecoderSession
from edgesmith.tasks.scoring import DEFAULT_BATCH_SIZE, SessionScorer

log = logging.getLogger(__name__)

#: tokens generated at most per ``generate_until`` request when the task does not say (lm-eval's default)
DEFAULT_MAX_GEN_TOKS = 256
_TRUE = ("1", "true", "yes", "on")


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


class EdgesmithLM(TemplateLM):
    """An lm-eval model over an edgesmith decoder artifact.

    ``lm_eval --model edgesmith --model_args artifact=PATH,runtime=llamacpp`` (through
    ``edgesmith-lm-eval``, which registers it) or, in Python, ``EdgesmithLM(artifact=..., ...)``;
    ``session=``/``artifact_obj=`` hand over an open session (what ``edgesmith evaluate`` does).
    """

    def __init__(self, artifact: str | None = None, runtime: str | None = None, threads: int | None = None,
                 batch_size: int | str | None = None, max_length: int | None = None,
                 add_bos_token: bool | str | None = None, *, artifact_obj: Artifact | None = None,
                 session: DecoderSession | None = None, **ignored: Any):
        super().__init__()
        from edgesmith.runtimes.generation import open_decoder

        ignored = {k: v for k, v in ignored.items() if v is not None and k not in ("device", "max_batch_size")}
        if ignored:
            raise BadInput(f"edgesmith model: unknown option(s) {', '.join(sorted(ignored))}; it takes artifact, "
                           "runtime, threads, batch_size, max_length, add_bos_token")
        if session is None:
            if artifact is None and artifact_obj is None:
                raise BadInput("edgesmith model: give the artifact to evaluate (--model_args artifact=PATH)")
            artifact_obj, session = open_decoder(artifact_obj or str(artifact), runtime=runtime,
                                                 threads=int(threads) if threads else None)
        if artifact_obj is None:
            raise BadInput("EdgesmithLM(session=...) needs the artifact it runs (artifact_obj=...)")
        if artifact_obj.task != "text-generation":
            raise BadInput(f"{artifact_obj.name} is a {artifact_obj.task} model; task accuracy needs a causal LM")
        self.artifact = artifact_obj
        self.session = session
        self.tokenizer = artifact_obj.tokenizer
        if self.tokenizer is None:
            raise BadInput(f"{artifact_obj.name} has no tokenizer; save one beside the model (tokenizer.save_pretrained)")
        self.add_bos_token = _flag(add_bos_token)
        size = DEFAULT_BATCH_SIZE if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.scorer = SessionScorer(session, batch_size=size, max_length=int(max_length) if max_length else None,
                                    pad_id=self._pad_id())

    # -- identity and tokens ---------------------------------------------------------------
    def _pad_id(self) -> int:
        for value in (getattr(self.tokenizer, "pad_token_id", None), self.session.pad_token_id,
                      *self.session.eos_token_ids, getattr(self.tokenizer, "eos_token_id", None)):
            if value is not None:
                return int(value)
        return 0

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None and self.session.eos_token_ids:
            eos = self.session.eos_token_ids[0]
        if eos is None:
            raise BadInput(f"{self.artifact.name}: neither the tokenizer nor the model names an EOS token")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = add_special_tokens if add_special_tokens is not None else bool(self.add_bos_token)
        return [int(t) for t in self.tokenizer(string, add_special_tokens=special)["input_ids"]]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- requests --------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scores = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
        out = []
        for (key, _, _), score in zip(requests, scores):
            result = (score.logprob, score.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        scores = self.scorer.loglikelihoods(windows)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, scores):
            totals[owner] += score.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from edgesmith.runtimes.generation import GenerationConfig, TextStream, decode_loop

        results = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0.0) > 0:
                log.warning("generate_until: sampling was asked for; edgesmith's adapter decodes greedily")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            stream = TextStream(self.tokenizer, until, skip_ids=list(getattr(self.tokenizer, "all_special_ids", []) or []))
            stops = sorted({self.eot_token_id, *self.session.eos_token_ids})

            def on_step(_step: int, chosen: np.ndarray, stream: TextStream = stream) -> list[bool]:
                if chosen[0] >= 0:
                    stream.push(int(chosen[0]))
                return [stream.stopped]

            decode_loop(self.session, np.asarray([ids], dtype=np.int64), None,
                        GenerationConfig(max_new_tokens=max_new, stop_strings=until), stop_ids=stops,
                        pad_id=self.scorer.pad_id, on_step=on_step)
            self.session.reset()
            stream.finish()
            self.cache_hook.add_partial("generate_until", req.args, stream.text)
            results.append(stream.text)
        return results

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.artifact.name, "model_kind": self.artifact.kind,
                "runtime": self.session.runtime, "providers": list(self.session.providers)}
