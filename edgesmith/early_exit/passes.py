"""The ``early-exit`` pass (exit heads, self-distillation, calibrated policy, ONNX segments) and
``quantize-segments`` (INT8 per segment).

``early-exit`` takes a BERT-family TorchModel (classifier or encoder) and returns an
:class:`~edgesmith.artifacts.EarlyExitModel`:

1. exit heads after the chosen layers (default: every layer from the second on; the last exit is
   the model's own output), see :mod:`edgesmith.early_exit.network`;
2. training by self-distillation from the model's own final output with edgesmith's training loop
   (:func:`edgesmith.training.train`: progress, checkpoints, exact resume): KL on softened logits
   for classifiers, cosine of mean-pooled embeddings for encoders. The backbone is frozen by
   default; ``train: joint`` trains it too, with a frozen copy of the original as the teacher;
3. calibration on held-out rows: the thresholds of the policy (entropy, maxprob, patience,
   agreement; one per exit by default, or one shared) that minimise expected layers while the
   budget holds against the *original* model (:mod:`edgesmith.early_exit.policy`);
4. export of each segment to ONNX (dynamo exporter, eager attention, dynamic batch and sequence)
   and validation segment by segment against PyTorch, each ONNX segment fed the PyTorch segment's
   own inputs, on padded batches of real sentences.

``quantize-segments`` quantizes each ONNX segment with ONNX Runtime's dynamic INT8 quantizer
(per-channel, MatMul/Gemm weights) and measures how far the quantized controller moves from the
float one (agreement / cosine of outputs, share of samples leaving at the same exit).

The training objective is :mod:`edgesmith.early_exit.objective`, the export and validation of the
ONNX segments :mod:`edgesmith.early_exit.segments`.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from edgesmith.artifacts import (
    EXIT_POLICY_FILE,
    EXIT_TORCH_DIR,
    META_FILE,
    EarlyExitModel,
    TorchModel,
)
from edgesmith.early_exit.network import ExitNetwork, check_exit_layers
from edgesmith.early_exit.objective import ExitObjective, ExitValidation, exit_outputs, single_token_mask
from edgesmith.early_exit.policy import (
    POLICIES,
    Budget,
    calibrate,
    check_policy,
    default_policy,
)
from edgesmith.early_exit.segments import export_segments, validate_segments
from edgesmith.errors import BadInput
from edgesmith.passes import Context, Pass, PassConfig, register
from edgesmith.training import TextBatches, TrainSettings, train

log = logging.getLogger(__name__)

#: held-out rows the training loop evaluates on (a subset of the calibration rows)
EVAL_ROWS = 256


class EarlyExitConfig(PassConfig):
    """Exits, training, policy and budget.

    ``exits``: layers after which an exit sits (1-based; the model's last layer is always added).
    ``thresholds``: ``per-exit`` (one calibrated threshold per exit) or ``shared`` (one for all).
    ``budget``: ``accuracy=MAX_DROP`` (classifiers: accuracy drop against the full model, on labels
    when there are labels, else 1 - agreement) or ``cosine=MIN`` (encoders: mean cosine of the
    sentence embeddings to the full model's). ``validation``: the first rows of the data, held out
    from training and used for calibration.
    """

    exits: list[int] | None = None
    policy: Literal["entropy", "maxprob", "patience", "agreement"] | None = None
    thresholds: Literal["per-exit", "shared"] = "per-exit"
    budget: str | None = None
    train: Literal["frozen", "joint"] = "frozen"
    data: str | None = None
    text_field: str = "text"
    label_field: str | None = None
    limit: int | None = None
    offset: int = 0
    validation: int = 1000
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    temperature: float = 2.0
    eval_every: int = 100
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None
    max_length: int = 128
    seed: int = 0
    opset: int | None = None
    atol: float = 1e-3
    min_cosine: float = 0.9999

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str | None) -> str | None:
        if value is not None:
            Budget.parse(value)  # raises BadInput, which pydantic reports as a value error
        return value

    @field_validator("validation", "steps", "batch_size", "max_length")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    def settings(self) -> TrainSettings:
        return TrainSettings(steps=self.steps, batch_size=self.batch_size, lr=self.lr, eval_every=self.eval_every,
                             checkpoint_every=self.checkpoint_every, max_length=self.max_length, seed=self.seed,
                             precision="fp32")


def resolve_budget(config: EarlyExitConfig, task: str) -> Budget:
    budget = Budget.parse(config.budget or ("accuracy=0.01" if task == "sequence-classification" else "cosine=0.98"))
    budget.check_task(task)
    return budget


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def exit_data(config: EarlyExitConfig, ctx: Context) -> tuple[list[str], list[Any] | None]:
    from edgesmith.data import pass_texts

    return pass_texts(ctx.texts, ctx.labels, data=config.data, text_field=config.text_field,
                      label_field=config.label_field, limit=config.limit, offset=config.offset, needed_by="early-exit")


def split_rows(texts: list[str], labels: list[Any] | None, validation: int
               ) -> tuple[list[str], list[str], list[Any] | None]:
    """(training texts, calibration texts, calibration labels): the first rows are held out (at most
    half of the data); training rows equal to a held-out text are dropped."""
    n_val = min(validation, len(texts) // 2)
    if n_val < 8 or len(texts) - n_val < 8:
        raise BadInput(f"early-exit needs at least 16 texts (got {len(texts)}): the first rows calibrate the "
                       "thresholds, the rest train the exit heads")
    held = texts[:n_val]
    seen = set(held)
    train_texts = [t for t in texts[n_val:] if t not in seen]
    return train_texts, held, (labels[:n_val] if labels else None)


@register
class EarlyExitPass(Pass):
    """TorchModel -> EarlyExitModel: exit heads, self-distillation, calibrated policy, ONNX segments."""

    name = "early-exit"
    config_class = EarlyExitConfig
    accepts = (TorchModel,)
    returns = EarlyExitModel
    description = "exit heads after chosen layers, trained by self-distillation, a calibrated exit policy, ONNX segments"
    uses = frozenset({"data"})
    config: EarlyExitConfig

    def apply(self, artifact: TorchModel, ctx: Context) -> EarlyExitModel:
        cfg = self.config
        task = artifact.task
        policy_name = cfg.policy or default_policy(task)
        check_policy(policy_name, task)
        budget = resolve_budget(cfg, task)
        tokenizer = artifact.tokenizer
        if tokenizer is None:
            raise BadInput(f"early-exit: model '{artifact.name}' has no tokenizer; save one beside the model")
        texts, labels = exit_data(cfg, ctx)
        train_texts, held, held_labels = split_rows(texts, labels, cfg.validation)
        label_ids = None
        if held_labels is not None and task == "sequence-classification":
            from edgesmith.quality import label_ids as to_ids

            label_ids = to_ids(artifact, held_labels, int(artifact.config.num_labels))

        module = copy.deepcopy(artifact.module).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = ExitNetwork(module, task, check_exit_layers(cfg.exits, _depth(module, task)))
        if len(net.exit_layers) < 2:
            raise BadInput(f"early-exit: no exit before the last layer of this {net.depth}-layer model; "
                           "give exits=[...] with layers below the last (e.g. --exits 1)")
        input_names = artifact.input_names
        report = self._train(net, tokenizer, train_texts, held, input_names, ctx)

        outputs = exit_outputs(net, tokenizer, held, max_length=cfg.max_length, input_names=input_names)
        # the budget is judged against the model that came in: with a frozen backbone that is the
        # last exit itself; a jointly trained backbone has moved, so the original is run again
        reference = None
        if cfg.train == "joint":
            original = ExitNetwork(copy.deepcopy(artifact.module).eval(), task, [net.depth], heads=nn.ModuleList())
            reference = exit_outputs(original, tokenizer, held, max_length=cfg.max_length,
                                     input_names=input_names)[-1]
        policy = calibrate(policy_name, task, net.exit_layers, outputs, single_token_mask(outputs), budget, label_ids,
                           thresholds=cfg.thresholds, reference=reference)
        log.info("early-exit %s: %s, %.2f of %d layers on average (%s)", artifact.name, policy.describe(),
                 policy.calibration["expected_layers"], net.depth, budget)

        folder = ctx.scratch("early-exit")
        segments, validation = self._deploy(artifact, net, folder, input_names, ctx)
        output = artifact.output_names[0]
        policy.save(folder / EXIT_POLICY_FILE, {"inputs": input_names, "output": output, "segments": segments,
                                                "heads": "classifier" if task == "sequence-classification" else "projection"})
        ctx.report.update({
            **report, "exit_layers": net.exit_layers, "policy": policy.name, "threshold": policy.threshold,
            "thresholds": policy.thresholds,
            "budget": str(budget), "calibration_texts": len(held),
            "expected_layers": policy.calibration["expected_layers"],
            "layer_fraction": policy.calibration["layer_fraction"],
            "exit_histogram": policy.calibration["histogram"],
            "calibration": policy.calibration, "segment_validation": validation,
        })
        meta = {**copy.deepcopy(artifact.meta), "exit_layers": net.exit_layers, "policy": policy.name,
                "precision": "fp32", "source_hash": artifact.content_hash()}
        return EarlyExitModel(task=task, name=artifact.name, lineage=copy.deepcopy(artifact.lineage), meta=meta,
                              folder=folder)

    def _train(self, net: ExitNetwork, tokenizer, train_texts: list[str], held: list[str], input_names: list[str],
               ctx: Context) -> dict[str, Any]:
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            objective = ExitObjective(net, joint=cfg.train == "joint", temperature=cfg.temperature)
        data = TextBatches(tokenizer, train_texts, batch_size=cfg.batch_size, max_length=cfg.max_length,
                           seed=cfg.seed, input_names=input_names)
        validation = ExitValidation(net, tokenizer, held[:EVAL_ROWS], max_length=cfg.max_length,
                                    input_names=input_names)
        checkpoint_dir, key = None, ""
        if cfg.checkpoint_every is not None:
            from edgesmith.storage import sha256_json

            key = sha256_json({"pass": "early-exit", "config": cfg.model_dump(mode="json", exclude={
                "checkpoint_every", "checkpoint_dir"}), "texts": sha256_json([train_texts, held])})
            root = Path(cfg.checkpoint_dir).expanduser() if cfg.checkpoint_dir else _default_checkpoints(ctx)
            checkpoint_dir = root / f"early-exit-{key[:20]}"
        result = train(objective, data, cfg.settings(), evaluate=validation, checkpoint_dir=checkpoint_dir, key=key,
                       progress=ctx.progress, device=torch.device("cpu"), on_step=ctx.extras.get("on_step"),
                       label="early-exit")
        if checkpoint_dir is not None:  # the pass's output is what is kept (and cached); its resume points go
            from edgesmith.training.ddp import rank_zero_remove

            rank_zero_remove(checkpoint_dir)
        net.eval()
        return {"train": cfg.train, "train_texts": len(train_texts), "steps_run": result.steps_run,
                "best_step": result.best_step, "exit_agreement_before": result.first_metric,
                "exit_agreement_after": result.best_metric, "train_seconds": round(result.seconds, 2),
                "resumed_from_step": result.resumed_from, "history": result.history}

    def _deploy(self, artifact: TorchModel, net: ExitNetwork, folder: Path, input_names: list[str],
                ctx: Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from safetensors.torch import save_model

        from edgesmith.export.graph import example_inputs, prepare_module, write_companions
        from edgesmith.validation import PROBE_POOL

        cfg = self.config
        trained = artifact.derive(module=net.model)
        eager = ExitNetwork(prepare_module(trained, "eager"), net.task, net.exit_layers,
                            heads=copy.deepcopy(net.heads)).eval()
        example = example_inputs(artifact, input_names)
        segments = export_segments(eager, folder, input_names=input_names, output=artifact.output_names[0],
                                   example=example, opset=cfg.opset, label=artifact.name)
        validation = validate_segments(eager, folder, segments, artifact.tokenizer, ctx.corpus(PROBE_POOL),
                                       input_names=input_names, atol=cfg.atol, min_cosine=cfg.min_cosine,
                                       label=artifact.name)
        write_companions(trained, folder)
        # the backbone as an edgesmith TorchModel folder: its structure record rebuilds a pruned
        # model that a stock config cannot describe (the tokenizer lives one folder up)
        torch_dir = folder / EXIT_TORCH_DIR
        trained.derive(tokenizer=None).save(torch_dir)
        save_model(net.heads, str(torch_dir / "exit_heads.safetensors"))
        return segments, validation


def _depth(module: nn.Module, task: str) -> int:
    from edgesmith.early_exit.network import base_of

    return len(base_of(module, task).encoder.layer)


def _default_checkpoints(ctx: Context) -> Path:
    if ctx.extras.get("checkpoint_dir"):
        return Path(ctx.extras["checkpoint_dir"])
    from edgesmith.cache import default_cache_dir

    return default_cache_dir() / "checkpoints"


# ---------------------------------------------------------------------------------------------
# quantize-segments
# ---------------------------------------------------------------------------------------------


class QuantizeSegmentsConfig(PassConfig):
    per_channel: bool = True
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm"])
    eval_texts: int = 128


@register
class QuantizeSegmentsPass(Pass):
    """EarlyExitModel -> EarlyExitModel with every ONNX segment quantized (dynamic INT8)."""

    name = "quantize-segments"
    config_class = QuantizeSegmentsConfig
    accepts = (EarlyExitModel,)
    returns = EarlyExitModel
    description = "ONNX Runtime dynamic INT8 quantization of each segment of an early-exit model"
    config: QuantizeSegmentsConfig

    def apply(self, artifact: EarlyExitModel, ctx: Context) -> EarlyExitModel:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from edgesmith.compress.quantization.int8 import quantizer_errors

        cfg = self.config
        folder = ctx.scratch("quantize-segments")
        assert artifact.folder is not None
        for f in artifact.folder.iterdir():
            if f.is_file() and f.suffix != ".onnx" and f.name != META_FILE:
                shutil.copy2(f, folder / f.name)  # policy, tokenizer, config; torch/ does not describe INT8 segments
        for path in artifact.segment_paths:
            with quantizer_errors(f"{path.name}: ONNX Runtime's quantizer cannot quantize it"):
                quantize_dynamic(onnx.load(str(path)), folder / path.name, op_types_to_quantize=list(cfg.op_types),
                                 per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        meta = {**copy.deepcopy(artifact.meta), "precision": "int8-dynamic"}
        out = EarlyExitModel(task=artifact.task, name=artifact.name, lineage=copy.deepcopy(artifact.lineage),
                             meta=meta, folder=folder)
        ctx.report.update(compare_controllers(artifact, out, ctx.corpus(cfg.eval_texts)))
        ctx.report["size_bytes"] = out.size_bytes()
        ctx.report["size_bytes_before"] = artifact.size_bytes()
        return out


def compare_controllers(reference: EarlyExitModel, candidate: EarlyExitModel, texts: list[str],
                        batch_size: int = 16) -> dict[str, float]:
    """How far ``candidate``'s ONNX Runtime controller is from ``reference``'s on ``texts``."""
    from edgesmith.early_exit.policy import pooled
    from edgesmith.inputs import tokenize
    from edgesmith.runtimes.base import default_runtime_for, get_runtime

    tokenizer = reference.tokenizer
    runtime = get_runtime(default_runtime_for(reference))  # an early-exit model's own: ONNX Runtime
    ref_s = runtime.load(reference)
    cand_s = runtime.load(candidate)
    same_exit, agree, cosines, layers = [], [], [], []
    try:
        for start in range(0, len(texts), batch_size):
            feeds = tokenize(tokenizer, texts[start:start + batch_size], input_names=ref_s.input_names)
            a, b = ref_s.run(feeds), cand_s.run(feeds)
            name = reference.output_names[0]
            same_exit.append(a["exit_layer"] == b["exit_layer"])
            layers.append(b["exit_layer"])
            if reference.task == "sequence-classification":
                agree.append(a[name].argmax(-1) == b[name].argmax(-1))
            else:
                mask = feeds["attention_mask"]
                cosines.append((pooled(a[name], mask) * pooled(b[name], mask)).sum(-1))
    finally:
        ref_s.close()
        cand_s.close()
    out = {"same_exit": float(np.concatenate(same_exit).mean()),
           "mean_layers": float(np.concatenate(layers).mean())}
    if agree:
        out["agreement"] = float(np.concatenate(agree).mean())
    if cosines:
        out["cosine"] = float(np.concatenate(cosines).mean())
    return out


__all__ = ["POLICIES", "EarlyExitConfig", "EarlyExitPass", "ExitObjective", "QuantizeSegmentsPass", "exit_outputs"]
