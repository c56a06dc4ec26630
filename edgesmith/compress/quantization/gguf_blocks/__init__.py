"""The ``gguf-quantize`` pass: a causal LM into llama.cpp's fast 4-bit formats (Q4_0, IQ4_NL) at
the fidelity the source had, written as a GGUF whose blocks are exactly what the quantizer chose.

Why these formats: on x86 with AVX2 and up (and ARM with dotprod/i8mm for Q4_0) llama.cpp repacks
Q4_0 and IQ4_NL into interleaved 8x8 blocks at load, and decodes them ~1.3-1.5x faster (prefill
2.3-2.6x) than Q4_1, which it never repacks. But a model whose FP32 weights already sit on another
grid (the embedded SmolLM2 is a dequantized Q4_1 file) loses most of its fidelity when rounded again
naively (Q4_0: KL 0.30-0.35, top-1 0.60).

``edgesmith quantize MODEL --to gguf --format q4_0 --method qat --steps 200`` (recipe step
``gguf-quantize: {...}``, Python ``es.quantize_gguf(model, ...)``):

1. **Calibration** (texts before the held-out slice of the shipped corpus, or the recipe's data):
   per-column input importance (mean x², llama.cpp's imatrix) and, for GPTQ, each linear's XᵀX.
2. **Scales**: ``rtn`` llama.cpp's reference rounding (max/−8), ``search`` activation-aware scale
   search per block, ``gptq`` the search plus GPTQ error feedback across columns, ``qat`` the
   ``gptq`` start then quantization-aware distillation (:mod:`.qat`).
3. **Mixed precision by measured sensitivity** (``keep_q8`` or ``kl_budget``): the KL each tensor
   alone costs in the format (measured on calibration text); the costliest stay Q8_0, reported per
   tensor.
4. **The file**: :func:`edgesmith.gguf.writer.write_gguf` with the chosen blocks byte for byte
   (embedding Q8_0, as llama.cpp's files keep it), then the verdict in llama.cpp (KL, top-1,
   perplexity on the held-out passages) against the input, gated by ``max_kld`` / ``min_top1``.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from edgesmith.artifacts import GGUF_FILE, Artifact, GgufModel, TorchModel
from edgesmith.compress.quantization.gguf_blocks.qat import freeze_embeddings, unwrap, wrap
from edgesmith.compress.quantization.gguf_blocks.search import (
    block_linears,
    collect_statistics,
    gptq,
    reference_scales,
    search_scales,
)
from edgesmith.compress.quantization.gguf_blocks.sensitivity import choose_q8, tensor_sensitivity
from edgesmith.compress.quantization.gguf_blocks.texts import kl_evaluator, token_batches, training_passages
from edgesmith.errors import BadInput
from edgesmith.export.gguf import gguf_verdict
from edgesmith.gguf.blocks import BLOCK, from_torch
from edgesmith.gguf.writer import hyper_of, write_gguf
from edgesmith.passes import ORIGIN_KEY, Context, Pass, PassConfig

log = logging.getLogger(__name__)

METHODS = ("rtn", "search", "gptq", "qat")
#: the scales' learning rate over the weights' when they train (learn_scales): Adam moves a parameter by
#: about lr a step whatever its size, and a block's scale is ~1/8 of its largest weight, so a tenth
SCALE_LR_FACTOR = 0.1


class GgufQuantizeConfig(PassConfig):
    """How the 4-bit blocks are chosen, and the gates on the written file."""

    format: Literal["q4_0", "iq4_nl"] = Field("q4_0", description="llama.cpp block format of the block linears")
    method: Literal["rtn", "search", "gptq", "qat"] = Field(
        "gptq", description="rtn: llama.cpp's reference rounding; search: activation-aware scales; gptq: search + "
                            "error feedback; qat: gptq, then quantization-aware distillation")
    steps: int = Field(200, ge=1, description="qat: optimizer steps")
    lr: float = Field(5e-5, gt=0, description="qat: peak learning rate (weights and scales)")
    batch_size: int = Field(4, ge=1, description="qat: passages per step")
    max_length: int = Field(128, ge=16, description="tokens per calibration / training passage")
    calibration: int = Field(64, ge=4, description="calibration passages (importance, Hessians, sensitivity)")
    teacher: Literal["input", "source"] = Field(
        "input", description="qat: distil towards the input model (default) or the recipe's source model")
    keep_q8: int = Field(0, ge=0, description="the N tensors whose quantization costs most KL stay Q8_0")
    kl_budget: float | None = Field(None, gt=0, description="keep the costliest tensors at Q8_0 until the summed "
                                                            "per-tensor KL of the rest is at most this")
    max_kld: float | None = Field(None, gt=0, description="gate: KL(input || file) in llama.cpp at most this")
    min_top1: float | None = Field(None, gt=0, le=1, description="gate: top-1 agreement at least this")
    data: str | None = Field(None, description="texts to calibrate and train on (jsonl/csv/parquet/txt with a 'text' "
                                               "field); default: the calibration side of the shipped corpus")
    learn_scales: bool = Field(False, description="qat: train the block scales too (LSQ-style); off: the scales stay "
                                                  "as the scale search / GPTQ chose them and only the weights move")
    eval_every: int = Field(50, ge=1, description="qat: steps between validation KL checks")
    checkpoint_every: int | None = Field(None, ge=1, description="qat: checkpoint (and resume) every N steps")
    seed: int = 0
    threads: int | None = Field(None, ge=1)

    KEY_OMITS_DEFAULT = ("threads",)


class GgufQuantizePass(Pass):
    """TorchModel (a causal LM) -> GgufModel in Q4_0 / IQ4_NL, blocks chosen by calibration or QAT."""

    name = "gguf-quantize"
    config_class = GgufQuantizeConfig
    accepts = (TorchModel,)
    returns = GgufModel
    description = "quantize a causal LM into llama.cpp's fast 4-bit formats (q4_0, iq4_nl): scale search, GPTQ, QAT"
    uses = frozenset({"source"})

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        assert isinstance(artifact, TorchModel)
        cfg: GgufQuantizeConfig = self.config  # type: ignore[assignment]
        module, tokenizer = _check(artifact, cfg)
        texts = _user_texts(cfg)
        t0 = time.perf_counter()
        batches = token_batches(tokenizer, count=cfg.calibration, tokens=cfg.max_length, texts=texts)
        stats = collect_statistics(module, batches, hessian=cfg.method in ("gptq", "qat"))
        plan = _initial_plan(module, stats, cfg)
        sensitivity: dict[str, float] = {}
        kept: list[str] = []
        if cfg.keep_q8 or cfg.kl_budget:
            sensitivity = tensor_sensitivity(module, plan, batches[: max(2, len(batches) // 4)],
                                             progress=ctx.progress)
            kept = choose_q8(sensitivity, keep=cfg.keep_q8, budget=cfg.kl_budget)
            for path in kept:
                weight = block_linears(module)[path].weight.detach().float()
                plan[path] = ("q8_0", weight, reference_scales(weight, "q8_0"))
        student = copy.deepcopy(module)
        train_report: dict[str, Any] = {}
        if cfg.method == "qat":
            teacher, teacher_hash = _teacher(artifact, cfg, ctx)
            train_report = _distil(student, teacher, tokenizer, plan, cfg, ctx, content=artifact.content_hash(),
                                   teacher_hash=teacher_hash, texts=texts)
            blocks = train_report.pop("blocks")
        else:
            blocks = {path: from_torch(fmt, w, s) for path, (fmt, w, s) in plan.items()}
        folder = ctx.scratch("gguf-quantize")
        try:
            report = write_gguf(student, tokenizer, folder / GGUF_FILE, quant=cfg.format,
                                blocks={f"{p}.weight": b for p, b in blocks.items()}, structure=artifact.structure,
                                name=artifact.name, origin=(artifact.meta.get(ORIGIN_KEY) or {}).get("gguf"))
            tokenizer.save_pretrained(folder)
            module.config.save_pretrained(folder)
            candidate = GgufModel(task=artifact.task, name=artifact.name, folder=folder,
                                  meta={ORIGIN_KEY: artifact.meta.get(ORIGIN_KEY)} if artifact.meta.get(ORIGIN_KEY)
                                  else {})
            verdict = _verdict(artifact, candidate, cfg)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        summary = {"format": cfg.format, "method": cfg.method, "q8_tensors": kept,
                   "sensitivity": dict(sorted(sensitivity.items(), key=lambda kv: -kv[1])),
                   "seconds": round(time.perf_counter() - t0, 1), **train_report,
                   **{k: v for k, v in report.items() if k != "path"}, "verdict": verdict}
        candidate.meta["gguf_export"] = {**report, "path": GGUF_FILE, "verdict": verdict,
                                         "quantizer": {k: v for k, v in summary.items() if k != "verdict"}}
        ctx.report.update(summary)
        return candidate


def _user_texts(cfg: GgufQuantizeConfig) -> list[str] | None:
    """The ``data`` file's texts (None: the shipped corpus); an empty file is one line."""
    if cfg.data is None:
        return None
    from edgesmith.data import load_texts

    texts = [t for t in load_texts(cfg.data).texts if t and t.strip()]
    if not texts:
        raise BadInput(f"gguf-quantize: the calibration data {cfg.data} has no texts; give a file with text rows "
                       "or leave data out to use the shipped corpus")
    return texts


def _check(artifact: TorchModel, cfg: GgufQuantizeConfig):
    if artifact.task != "text-generation":
        raise BadInput(f"gguf-quantize: llama.cpp runs causal LMs; {artifact.name} is a {artifact.task} model")
    if not artifact.is_huggingface:
        raise BadInput(f"gguf-quantize: {artifact.name} is not a Hugging Face model; the GGUF writer reads its config")
    if artifact.tokenizer is None:
        raise BadInput(f"gguf-quantize: {artifact.name} has no tokenizer; save one beside the model")
    module = artifact.module
    hyper_of(module.config, artifact.structure)  # one line for an architecture llama.cpp's graph cannot take
    ragged = [f"{name} ({m.in_features} inputs)" for name, m in module.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}" and m.in_features % BLOCK]
    if ragged:
        raise BadInput(f"gguf-quantize: {cfg.format} blocks hold {BLOCK} weights of a row, and {ragged[0]} has rows "
                       f"that are not whole blocks ({len(ragged)} such layers); write it with export --to gguf "
                       "--quant f16 instead")
    return module, artifact.tokenizer


def _initial_plan(module, stats, cfg: GgufQuantizeConfig) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """{linear path: (format, weight, scales)} by the method (qat starts from gptq)."""
    plan = {}
    for path, linear in block_linears(module).items():
        weight = linear.weight.detach().float()
        imp = stats.get(path, {}).get("importance")
        if cfg.method == "rtn":
            plan[path] = (cfg.format, weight, reference_scales(weight, cfg.format))
        elif cfg.method == "search":
            plan[path] = (cfg.format, weight, search_scales(weight, imp, cfg.format))
        else:
            updated, scales = gptq(weight, stats[path]["hessian"], imp, cfg.format)
            plan[path] = (cfg.format, updated, scales)
    return plan


def _teacher(artifact: TorchModel, cfg: GgufQuantizeConfig, ctx: Context) -> tuple[torch.nn.Module, str]:
    if cfg.teacher == "source":
        if not isinstance(ctx.source, TorchModel):
            raise BadInput("gguf-quantize: teacher: source needs a recipe whose source is a PyTorch model")
        if ctx.source.tokenizer is not None and len(ctx.source.tokenizer) != len(artifact.tokenizer):
            raise BadInput("gguf-quantize: the source's and the input's tokenizers differ; use teacher: input")
        return ctx.source.module, ctx.source.content_hash()
    return artifact.module, artifact.content_hash()


def _checkpoint_root(ctx: Context) -> Path:
    if ctx.extras.get("checkpoint_dir"):
        return Path(ctx.extras["checkpoint_dir"])
    from edgesmith.cache import default_cache_dir

    return default_cache_dir() / "checkpoints"


def _distil(student, teacher, tokenizer, plan, cfg: GgufQuantizeConfig, ctx: Context, *, content: str,
            teacher_hash: str, texts: list[str] | None) -> dict[str, Any]:
    """Quantization-aware distillation of ``student`` (wrapped by ``plan``) towards ``teacher``."""
    from edgesmith.compress.distillation.objective import DistillObjective
    from edgesmith.storage import sha256_json
    from edgesmith.training.batches import TextBatches
    from edgesmith.training.ddp import default_device, rank_zero_remove
    from edgesmith.training.loop import LR_SCALE_ATTR, train
    from edgesmith.training.settings import TrainSettings

    wrapped = wrap(student, plan)
    freeze_embeddings(student)
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    objective = DistillObjective(student, teacher, task="text-generation", losses={"kl": 1.0}, temperature=1.0,
                                 layer_pairs=[], project=None, input_names=["input_ids", "attention_mask"])
    train_texts = training_passages(tokenizer, tokens=cfg.max_length,
                                    count=max(cfg.steps * cfg.batch_size // 2, 64), offset=4000, texts=texts)
    data = TextBatches(tokenizer, train_texts, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed,
                       input_names=objective.input_names)
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0,
                             warmup_ratio=0.05, schedule="cosine", precision="fp32", seed=cfg.seed,
                             eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                             max_length=cfg.max_length)
    eval_batches = token_batches(tokenizer, count=8, tokens=cfg.max_length, offset=2000, texts=texts)
    checkpoint_dir, key = None, ""
    if cfg.checkpoint_every is not None:
        key = sha256_json({"pass": "gguf-quantize", "config": cfg.model_dump(mode="json", exclude={"threads"}),
                           "student": content, "teacher": teacher_hash})
        checkpoint_dir = _checkpoint_root(ctx) / f"gguf-qat-{key[:20]}"
    for layer in wrapped.values():
        layer.scales.requires_grad_(cfg.learn_scales)
        setattr(layer.scales, LR_SCALE_ATTR, SCALE_LR_FACTOR)
    device = default_device()  # CUDA when there is one; under torchrun every rank trains (DDP in the loop)
    teacher.to(device)
    evaluate = kl_evaluator([{k: v.to(device) for k, v in b.items()} for b in eval_batches], teacher)
    result = train(objective, data, settings, evaluate=evaluate, checkpoint_dir=checkpoint_dir, key=key,
                   progress=ctx.progress, device=device, on_step=ctx.extras.get("on_step"), label="qat")
    if checkpoint_dir is not None:
        rank_zero_remove(checkpoint_dir)
    student.to("cpu")
    blocks = unwrap(student, wrapped)
    return {"blocks": blocks, "steps_run": result.steps_run, "best_step": result.best_step,
            "train_seconds": round(result.seconds, 1), "history": result.history, "world_size": result.world_size,
            "val_kl_before": -result.history[0]["metric"] if result.history else None,
            "val_kl_after": -max(h["metric"] for h in result.history) if result.history else None}


def _verdict(source: TorchModel, candidate: GgufModel, cfg: GgufQuantizeConfig) -> dict[str, Any]:
    return gguf_verdict(source, candidate, threads=cfg.threads, max_kld=cfg.max_kld, min_top1=cfg.min_top1,
                        what=f"gguf-quantize {cfg.format} ({cfg.method})",
                        hint="try method qat with more steps, keep_q8 / kl_budget, or export --to gguf --quant q8_0")
