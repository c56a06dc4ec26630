"""Export a TorchModel to ONNX (torch.onnx, dynamo exporter) and prove the graph matches its source.

The export pass writes an Optimum-like folder: ``model.onnx`` (one file, dynamic ``batch`` and
``sequence`` axes, named inputs such as ``input_ids``/``attention_mask``/``token_type_ids`` and one
named output: ``last_hidden_state`` or ``logits``), ``config.json`` and the tokenizer files. It then
runs the source module and the graph side by side on real sentences (:func:`compare_outputs`)
and refuses the export (:class:`~edgesmith.errors.ValidationFailed`, exit 3) when they disagree.

The models are exported with eager attention by default: under the dynamo exporter the SDPA path
gives wrong values on left-padded positions of decoders, and eager graphs run faster in ONNX
Runtime. The input module is never touched: a deep copy is switched and exported.

Probes (see :func:`probe_feeds`): for each batch size in ``batches``, one batch padded to its
longest text, and one padded (or truncated) to each fixed length in ``seq_lengths``. The texts of a
batch are picked across the length range of the corpus (single sentences and short paragraphs of
joined sentences), so every batch of more than one row has padded positions. Models of the
``text-generation`` task are probed with left padding as well.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgesmith.artifacts import ONNX_FILE, Artifact, OnnxModel, TorchModel
from edgesmith.errors import BadInput, ValidationFailed
from edgesmith.export.graph import example_inputs, export_graph, export_meta, prepare_module, write_companions
from edgesmith.passes import Context, Pass, PassConfig, register
from edgesmith.validation import DEFAULT_BATCHES, DEFAULT_SEQ_LENGTHS, PROBE_POOL, validate

log = logging.getLogger(__name__)



class ExportConfig(PassConfig):
    """How to export and how close the graph must stay to its source.

    ``probe_batches`` and ``probe_seq_lengths`` give the probe shapes: each batch size once padded
    to its longest text and once per fixed length (see the module's docstring).
    """

    opset: int | None = None  # None: the exporter's default (20 for torch 2.13's dynamo exporter)
    atol: float = 1e-3  # max abs diff allowed on non-padded positions
    min_cosine: float = 0.9999  # min cosine of mean-pooled rows (pooled with the attention mask)
    attention: Literal["eager", "sdpa"] = "eager"
    probe_batches: list[int] = list(DEFAULT_BATCHES)
    probe_seq_lengths: list[int] = list(DEFAULT_SEQ_LENGTHS)
    #: decoders (causal LMs): greedy steps that must agree token for token with PyTorch
    decode_steps: int = Field(32, ge=1)
    #: decoders: ``dynamo`` (edgesmith's own KV-cached graph, any padding) or ``genai`` (an ORT GenAI
    #: folder from its model builder: fused GroupQueryAttention, faster on the CPU, right padding,
    #: runs in ONNX Runtime GenAI too; ``export --to genai``; see :mod:`edgesmith.export.decoder_genai`)
    backend: Literal["dynamo", "genai"] = "dynamo"

    KEY_OMITS_DEFAULT = ("decode_steps", "backend")


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


@register
class ExportPass(Pass):
    """TorchModel -> OnnxModel with dynamic batch and sequence axes, validated against the source."""

    name = "export"
    config_class = ExportConfig
    accepts = (TorchModel,)
    returns = OnnxModel
    description = "export to ONNX (torch.onnx dynamo exporter) and validate against the torch model"

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        assert isinstance(artifact, TorchModel)
        cfg: ExportConfig = self.config  # type: ignore[assignment]
        folder = ctx.scratch("export")
        if artifact.task == "text-generation":
            return self._decoder(artifact, folder, cfg, ctx)
        if cfg.backend != "dynamo":
            raise BadInput(f"backend {cfg.backend} builds causal LMs only; {artifact.name} is a {artifact.task} model "
                           "(drop backend, or use backend dynamo)")
        module = prepare_module(artifact, cfg.attention)
        input_names = artifact.input_names
        output = artifact.output_names[0]
        export_graph(module, folder / ONNX_FILE, input_names=input_names, output_name=output,
                     example=example_inputs(artifact, input_names), opset=cfg.opset, label=artifact.name)
        write_companions(artifact, folder)
        meta = {**copy.deepcopy(artifact.meta), **export_meta(artifact, module, folder / ONNX_FILE, cfg.attention)}
        candidate = OnnxModel(task=artifact.task, name=artifact.name, lineage=copy.deepcopy(artifact.lineage),
                              meta=meta, folder=folder)
        try:
            result = validate(artifact, candidate, cfg.atol, cfg.min_cosine, texts=ctx.corpus(PROBE_POOL),
                              batches=cfg.probe_batches, seq_lengths=cfg.probe_seq_lengths)
        except ValidationFailed:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        ctx.report.update(result)
        ctx.report["size_bytes"] = candidate.size_bytes()
        log.info("exported %s to ONNX: max abs diff %.2e, min cosine %.6f", artifact.name,
                 result["max_abs"], result["min_cosine"])
        return candidate


    @staticmethod
    def _decoder(artifact: TorchModel, folder: Path, cfg: ExportConfig, ctx: Context) -> OnnxModel:
        """A causal LM: one KV-cached graph for prefill and decode, validated token for token
        (:mod:`edgesmith.export.decoder`, or with backend genai :mod:`edgesmith.export.decoder_genai`)."""
        from edgesmith.export.decoder import write_decoder

        if cfg.attention != "eager":
            raise BadInput("decoders export with eager attention only (SDPA gives wrong values on left-padded "
                           "positions under the dynamo exporter); drop attention='sdpa'")
        if cfg.backend == "genai" and cfg.opset is not None:
            raise BadInput("opset applies to backend dynamo; ORT GenAI's builder picks its own (drop opset)")
        try:
            if cfg.backend == "genai":
                from edgesmith.export.decoder_genai import write_genai_decoder

                candidate = write_genai_decoder(artifact, folder, atol=cfg.atol, steps=cfg.decode_steps)
            else:
                candidate = write_decoder(artifact, folder, opset=cfg.opset, atol=cfg.atol, steps=cfg.decode_steps)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        ctx.report.update(candidate.meta.get("validation", {}))
        ctx.report["size_bytes"] = candidate.size_bytes()
        return candidate


