"""The ``gguf`` pass: a causal LM written as a GGUF for llama.cpp, validated against its source.

``edgesmith export MODEL --to gguf --quant q4_1`` (recipe step ``gguf: {quant: q4_1}``, Python
``es.export.to_gguf(model, quant="q4_1")``) writes ``model.gguf`` (:mod:`edgesmith.gguf.writer`) with
the tokenizer and config files beside it, then:

- ``f32`` / ``f16`` / ``bf16``: every tensor is read back with the ``gguf`` package's reader, undone
  into Hugging Face's layout and compared with the source's weights: equal bit for bit (F32), or to
  the source cast to the file's type (F16/BF16). Anything else is a failed export (exit 3).
- quantized types: a **verdict** in KL divergence, top-1 agreement and perplexity against the
  source on the held-out corpus passages (:func:`edgesmith.lm_quality.lm_fidelity`), measured in
  llama.cpp when llama-cpp-python is installed (``runtime: auto`` or ``llamacpp``), else by
  transformers reading the file back (the weights' rounding only; llama.cpp's own kernels also
  round activations to 8 bits). ``max_kld`` / ``min_top1`` turn the verdict into a gate (exit 3).

A model that came from a GGUF keeps its file's ``tokenizer.ggml.pre`` (``meta["origin"]``); other
models get ``tokenizer_pre`` or ``default`` (see :mod:`edgesmith.gguf.vocab`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from edgesmith.artifacts import GGUF_FILE, Artifact, GgufModel, TorchModel
from edgesmith.errors import BadInput, ValidationFailed
from edgesmith.gguf.file import open_gguf
from edgesmith.gguf.writer import NUMPY_QUANTS, QUANTS, gguf_tensors, hyper_of, write_gguf
from edgesmith.lm_quality import gguf_logits, lm_fidelity
from edgesmith.passes import ORIGIN_KEY, Context, Pass, PassConfig, register

log = logging.getLogger(__name__)

EXACT_TYPES = {"f32": np.float32, "f16": np.float16}


class GgufConfig(PassConfig):
    """The GGUF's quant type and how its verdict is taken."""

    quant: str = Field("f16", description=f"one of {', '.join(QUANTS)}")
    embeddings: str | None = Field(None, description="type of token_embd (and an untied output head); "
                                                     "default q8_0 under 4/5-bit types, else quant")
    tokenizer_pre: str | None = Field(None, description="llama.cpp pre-tokenizer name; default: the origin GGUF's")
    runtime: Literal["auto", "llamacpp", "transformers"] = Field(
        "auto", description="where quantized files are scored: llama.cpp when installed (auto), or transformers")
    max_kld: float | None = Field(None, gt=0, description="gate: KL(source || gguf) at most this (nats/token)")
    min_top1: float | None = Field(None, gt=0, le=1, description="gate: top-1 agreement at least this")
    threads: int | None = Field(None, ge=1)

    KEY_OMITS_DEFAULT = ("runtime", "threads")

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, value: str) -> str:
        if value.lower() not in QUANTS:
            raise ValueError(f"{value!r} is not a GGUF quant type edgesmith writes; choose one of {', '.join(QUANTS)}")
        return value.lower()

    @field_validator("embeddings")
    @classmethod
    def _known_embeddings(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in NUMPY_QUANTS:
            raise ValueError(f"{value!r} is not a type for the embedding; choose one of {', '.join(NUMPY_QUANTS)}")
        return None if value is None else value.lower()


def read_back_differences(module, path: Path, quant: str) -> dict[str, Any]:
    """Compare every tensor of an F32/F16 file with the source's, in llama.cpp's layout."""
    hyper = hyper_of(module.config)
    expected = dict(gguf_tensors(module, hyper))
    found = {t.name: t for t in open_gguf(path).tensors}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    unequal = []
    for name, want in expected.items():
        if name not in found:
            continue
        tensor = found[name]
        got = np.asarray(tensor.data).reshape(want.shape)
        target = want if want.ndim < 2 else want.astype(EXACT_TYPES[quant])
        if got.dtype != target.dtype or not np.array_equal(got, target.astype(got.dtype)):
            unequal.append(name)
    return {"tensors": len(expected), "missing": missing, "extra": extra, "unequal": unequal}


@register
class GgufPass(Pass):
    """TorchModel (a causal LM) -> GgufModel, tensor-exact or with a KL/top-1 verdict."""

    name = "gguf"
    config_class = GgufConfig
    accepts = (TorchModel,)
    returns = GgufModel
    description = "write a GGUF for llama.cpp (f16, q8_0, q4_0, q4_1; K-quants via llama.cpp) and validate it"

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        assert isinstance(artifact, TorchModel)
        cfg: GgufConfig = self.config  # type: ignore[assignment]
        if artifact.task != "text-generation":
            raise BadInput(f"gguf: llama.cpp runs causal LMs; {artifact.name} is a {artifact.task} model "
                           "(export it to ONNX instead)")
        if not artifact.is_huggingface:
            raise BadInput(f"gguf: {artifact.name} is not a Hugging Face model; GGUF export reads its config")
        folder = ctx.scratch("gguf")
        quant = cfg.quant
        origin = (artifact.meta.get(ORIGIN_KEY) or {}).get("gguf")
        try:
            report = write_gguf(artifact.module, artifact.tokenizer, folder / GGUF_FILE, quant=quant,
                                embeddings=cfg.embeddings, structure=artifact.structure, name=artifact.name,
                                tokenizer_pre=cfg.tokenizer_pre, origin=origin)
            artifact.tokenizer.save_pretrained(folder)
            artifact.module.config.save_pretrained(folder)
            candidate = GgufModel(task=artifact.task, name=artifact.name, folder=folder,
                                  meta={ORIGIN_KEY: artifact.meta.get(ORIGIN_KEY)} if origin else {})
            verdict = self._validate(artifact, candidate, quant, report, cfg)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        candidate.meta["gguf_export"] = {**report, "path": GGUF_FILE, "verdict": verdict}
        ctx.report.update({k: v for k, v in report.items() if k != "path"})
        ctx.report["verdict"] = verdict
        return candidate

    @staticmethod
    def _validate(source: TorchModel, candidate: GgufModel, quant: str, report: dict, cfg: GgufConfig
                  ) -> dict[str, Any]:
        if quant in EXACT_TYPES and not report["f16_fallbacks"]:
            diff = read_back_differences(source.module, candidate.path, quant)
            if diff["missing"] or diff["extra"] or diff["unequal"]:
                raise ValidationFailed(f"gguf: the written file does not read back as the source: missing "
                                       f"{diff['missing'][:3]}, extra {diff['extra'][:3]}, unequal {diff['unequal'][:3]}")
            log.info("GGUF %s: %d tensors read back exactly", quant, diff["tensors"])
            return {"exact": True, "tensors": diff["tensors"]}
        return gguf_verdict(source, candidate, runtime=cfg.runtime, threads=cfg.threads, max_kld=cfg.max_kld,
                            min_top1=cfg.min_top1, what=f"gguf {quant}", hint="try a wider type such as q8_0")


def gguf_verdict(source: TorchModel, candidate: GgufModel, *, runtime: str = "auto", threads: int | None = None,
                 max_kld: float | None = None, min_top1: float | None = None, what: str = "gguf",
                 hint: str = "") -> dict[str, Any]:
    """KL / top-1 / perplexity of a quantized GGUF against its source on the held-out passages (in
    llama.cpp when installed), and the gates on them: ValidationFailed (exit 3) naming ``what``."""
    fn, measured_in = gguf_logits(candidate, runtime, threads=threads)
    result = lm_fidelity(fn, source, tokenizer=source.tokenizer)
    failures = []
    if max_kld is not None and result["kld"] > max_kld:
        failures.append(f"KL {result['kld']:.4f} > max_kld {max_kld}")
    if min_top1 is not None and result["top1"] < min_top1:
        failures.append(f"top-1 {result['top1']:.3f} < min_top1 {min_top1}")
    if failures:
        raise ValidationFailed(f"{what}: {'; '.join(failures)} (measured in {measured_in} on {result['tokens']} "
                               f"held-out tokens)" + (f"; {hint}" if hint else ""))
    log.info("%s: KL %.4f, top-1 %.3f, perplexity %.2f (source %.2f), measured in %s", what, result["kld"],
             result["top1"], result["perplexity"], result["perplexity_reference"], measured_in)
    return {"exact": False, "measured_in": measured_in, **result}
