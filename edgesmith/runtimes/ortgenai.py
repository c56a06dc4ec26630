"""The ortgenai runtime runs an ORT GenAI folder in ONNX Runtime GenAI's own generation loop.

An ORT GenAI folder has ``genai_config.json`` beside the graph; its C++ loop is how the people who
ship ONNX decoders run them (Windows apps, ORT Mobile, NPU execution providers).

``edgesmith export MODEL --to genai`` writes such a folder (:mod:`edgesmith.export.decoder_genai`);
``edgesmith quantize FOLDER --mode int4`` keeps it one. The session drives ``og.Model`` /
``og.Generator``:

- **prefill**: the rows (edgesmith's left-padded batch) are re-padded on the **right** with the
  folder's ``pad_token_id``, which is ORT GenAI's own batch contract (its ``PadInputs`` right-pads;
  a row's mask is 1 up to its last token that is not the pad id); ``get_logits`` gives each row's
  last real position. ORT GenAI reads a row that *ends* in the pad id as shorter, so such a batch is
  refused (one line) rather than silently answered wrong.
- **step** with tokens chosen by edgesmith's sampler: ``append_tokens`` for one row; ORT GenAI takes
  ``append_tokens`` only once for a batch of more than one row, so there the chosen tokens go in
  through its own search —
  ``set_logits`` with every other token at -1e9, then ``generate_next_token`` (which picks exactly
  them) — and ``get_logits`` runs the model on them.
- **decode_rows** (batched profiles, and ``profile --runtime ortgenai``): ORT GenAI's own greedy loop,
  ``generate_next_token`` in C++ with ``min_length = max_length`` (its search has no "ignore EOS";
  EOS is forbidden until the length instead).
- **logits** (scoring, KL): one generator per batch; the graph's ``logits`` output holds every
  position when its ``logits_to_keep`` keeps its default (all).
- **rollback** (speculative decoding): ``rewind_to``.

Threads: ORT GenAI's defaults unless ``threads`` is given (then ``intra_op_num_threads`` through a
config overlay, inter-op 1). The KV buffer is ``max_length`` positions long (past and present share
it under GroupQueryAttention), so the session asks for what the generation needs: a profile passes
the prompt plus new tokens (:meth:`OrtGenAIRuntime.generation_options`); otherwise
:data:`DEFAULT_MAX_LENGTH` (SmolLM2: 47 KB a position for all layers at batch 1).

Layer L2 (a runtime): imports artifacts, errors and the runtime base modules only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgesmith.artifacts import META_FILE, Artifact, OnnxModel
from edgesmith.errors import BadInput, first_line
from edgesmith.runtimes.base import Availability, Runtime, register_runtime
from edgesmith.runtimes.decoder import DecoderSession, check_context
from edgesmith.runtimes.mlas_check import check_asymmetric_int4

log = logging.getLogger(__name__)

CONFIG_FILE = "genai_config.json"
#: positions a session's generators hold unless told (a profile asks for exactly what it needs)
DEFAULT_MAX_LENGTH = 2048
#: logit given to every token but the chosen one when edgesmith's sampler steers ORT GenAI's search
_FORBIDDEN = -1e9


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise BadInput("runtime ortgenai needs ONNX Runtime GenAI: pip install onnxruntime-genai") from exc
    return og


def genai_folder(artifact: Artifact | str | Path) -> Path:
    """The folder holding ``genai_config.json`` for ``artifact`` (one line when it has none)."""
    folder = Path(artifact) if isinstance(artifact, str | Path) else getattr(artifact, "folder", None)
    if folder is None or not Path(folder, CONFIG_FILE).is_file():
        name = folder if folder is not None else getattr(artifact, "name", artifact)
        raise BadInput(f"{name}: not an ORT GenAI folder (no {CONFIG_FILE}); export the model with "
                       "edgesmith export MODEL --to genai -o FOLDER")
    return Path(folder)


def read_genai_config(folder: Path) -> dict[str, Any]:
    """``genai_config.json``, checked for what ``og.Model`` requires (one line naming the gap)."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not readable JSON ({first_line(exc)}); re-export with edgesmith export --to genai") from exc
    model = config.get("model") if isinstance(config, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    missing = [key for key, where in (("model", model), ("model.decoder", decoder)) if not isinstance(where, dict)]
    if not missing:
        missing = [f"model.{k}" for k in ("type", "context_length", "vocab_size") if k not in model]
        missing += [f"model.decoder.{k}" for k in ("filename", "head_size", "num_key_value_heads",
                                                     "num_attention_heads", "num_hidden_layers", "hidden_size")
                    if k not in decoder]
    if missing:
        raise BadInput(f"{path}: missing {', '.join(missing)}, which ORT GenAI needs; re-export with "
                       "edgesmith export MODEL --to genai")
    if not (folder / decoder["filename"]).is_file():
        raise BadInput(f"{path}: names graph {decoder['filename']}, which is not in {folder}; re-export the folder")
    return config


def _ids(config: dict[str, Any], key: str) -> list[int]:
    value = config["model"].get(key)
    return [int(v) for v in value] if isinstance(value, list) else ([] if value is None else [int(value)])


class OrtGenAIDecoderSession(DecoderSession):
    """An ORT GenAI folder in ``og.Generator`` (see the module docstring for how each call maps)."""

    runtime = "ortgenai"
    OPTIONS: ClassVar[tuple[str, ...]] = ("max_length",)
    BATCHING: ClassVar[str] = ("ORT GenAI's own static batch: rows right-padded with its pad id, greedy "
                               "generate_next_token in C++")

    def __init__(self, model: Artifact | str | Path, *, threads: int | None = None, max_length: int | None = None):
        super().__init__()
        og = import_genai()
        self.folder = genai_folder(model)
        config = read_genai_config(self.folder)
        self.vocab_size = int(config["model"]["vocab_size"])
        self.max_positions = int(config["model"]["context_length"])
        self.num_layers = int(config["model"]["decoder"]["num_hidden_layers"])
        self.eos_token_ids = _ids(config, "eos_token_id")
        pads = _ids(config, "pad_token_id") or self.eos_token_ids[:1]
        self.pad_token_id = pads[0] if pads else 0
        check_asymmetric_int4(self.folder / config["model"]["decoder"]["filename"])
        self.max_length = int(max_length or min(self.max_positions, DEFAULT_MAX_LENGTH))
        if self.max_length < 2:
            raise BadInput(f"max_length {self.max_length}: a generator needs room for at least two positions")
        try:
            og_config = og.Config(str(self.folder))
            if threads:
                og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
            self.model = og.Model(og_config)
        except Exception as exc:  # ORT GenAI raises RuntimeError for a folder it cannot load
            raise BadInput(f"{self.folder}: ORT GenAI cannot load it ({first_line(exc)[:300]}); re-export with "
                           "edgesmith export MODEL --to genai") from exc
        self._og = og
        self._generator: Any = None
        self.providers = [str(self.model.device_type)]
        self.options = {"threads": threads, "max_length": self.max_length, "kv_cache": "ort-genai",
                        "onnxruntime_genai": getattr(og, "__version__", "unknown")}

    # -- ORT GenAI's generator ----------------------------------------------------------------------

    def _new_generator(self, rows: int, *, length: int | None = None, forced: bool = False):
        params = self._og.GeneratorParams(self.model)
        total = int(length or self.max_length)
        options: dict[str, Any] = {"max_length": total, "do_sample": False, "batch_size": int(rows)}
        if forced:
            options["min_length"] = total
        params.set_search_options(**options)
        return self._og.Generator(self.model, params)

    def _right_padded(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """edgesmith's (left-)padded rows as ORT GenAI's right-padded int32 batch."""
        rows = [ids[i][mask[i].astype(bool)] for i in range(ids.shape[0])]
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        for i, row in enumerate(rows):
            if len(rows) > 1 and len(row) and int(row[-1]) == self.pad_token_id:
                raise BadInput(f"prompt {i} ends with token {self.pad_token_id}, ORT GenAI's pad id in "
                               f"{self.folder / CONFIG_FILE}: in a batch it would read the prompt as shorter; run it alone")
            out[i, :len(row)] = row
        return out

    def _append(self, generator, batch: np.ndarray) -> None:
        try:
            generator.append_tokens(batch)
        except RuntimeError as exc:
            raise BadInput(f"{self.folder}: ORT GenAI refused the batch ({first_line(exc)[:300]})") from exc

    def _logits(self, generator) -> np.ndarray:
        return np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1, 1, self.vocab_size)

    # -- DecoderSession --------------------------------------------------------------------------

    def _forward(self, ids, mask, positions, *, start, keep):
        if start:
            batch = self._right_padded(ids, mask)
            if batch.shape[1] >= self.max_length:
                raise BadInput(f"a {batch.shape[1]}-token prompt leaves no room in this session's {self.max_length} "
                               "positions; open it with a larger max_length")
            self._generator = self._new_generator(batch.shape[0])
            self._append(self._generator, batch)
            return self._logits(self._generator)
        if self._generator is None:
            raise BadInput("step() before prefill(): start a sequence with prefill(input_ids, attention_mask)")
        if ids.shape[1] != 1:
            if ids.shape[0] != 1:
                raise BadInput("ORT GenAI appends several tokens at once only for one row; verify drafts one row at a time")
            self._append(self._generator, ids.astype(np.int32))
            full = np.asarray(self._generator.get_output("logits"), dtype=np.float32)
            return full[:, -keep:, :]
        if int(self._generator.token_count()) + 1 > self.max_length:
            raise BadInput(f"the sequence reached this session's max_length of {self.max_length} positions; "
                           "open the session with a larger max_length (at most the context, "
                           f"{self.max_positions})")
        if ids.shape[0] == 1:  # one row: ORT GenAI appends as often as asked (also after a rewind)
            self._append(self._generator, ids.astype(np.int32))
            return self._logits(self._generator)
        forced = np.full((ids.shape[0], self.vocab_size), _FORBIDDEN, dtype=np.float32)
        forced[np.arange(ids.shape[0]), ids[:, 0]] = 0.0
        self._generator.set_logits(forced)
        self._generator.generate_next_token()
        return self._logits(self._generator)

    def _full(self, ids, mask, positions):
        batch = self._right_padded(ids, mask)
        generator = self._new_generator(batch.shape[0], length=max(batch.shape[1] + 1, 2))
        self._append(generator, batch)
        full = np.asarray(generator.get_output("logits"), dtype=np.float32)
        if full.shape[1] != batch.shape[1]:
            raise BadInput(f"{self.folder}: the graph gave logits for {full.shape[1]} of {batch.shape[1]} positions; "
                           "scoring needs every position (re-export with edgesmith export --to genai)")
        out = np.zeros((ids.shape[0], ids.shape[1], full.shape[2]), dtype=np.float32)
        for i in range(ids.shape[0]):  # back to the caller's layout: real tokens where its mask has them
            where = np.flatnonzero(mask[i])
            out[i, where] = full[i, :len(where)]
        return out

    def _truncate(self, length: int) -> None:
        if self._mask is not None and not self._mask.all():
            raise BadInput("ORT GenAI rolls back an unpadded sequence only; verify drafts one row at a time")
        self._generator.rewind_to(int(length))

    def decode_rows(self, rows, new_tokens: int, pad_id: int):
        """ORT GenAI's own batched greedy loop: the rows right-padded with its pad id, then
        ``generate_next_token`` in C++ (TTFT = ``append_tokens`` + the first one)."""
        from edgesmith.runtimes.generation import DecodeRun

        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        batch = self._right_padded(ids, mask)
        total = batch.shape[1] + int(new_tokens)
        check_context([batch.shape[1]], int(new_tokens), self.max_positions, str(self.folder))
        generator = self._new_generator(batch.shape[0], length=total, forced=True)
        tokens = np.zeros((batch.shape[0], int(new_tokens)), dtype=np.int64)
        t0 = time.perf_counter()
        self._append(generator, batch)
        generator.generate_next_token()
        tokens[:, 0] = generator.get_next_tokens()
        ttft = (time.perf_counter() - t0) * 1000.0
        latencies = []
        for step in range(1, int(new_tokens)):
            t0 = time.perf_counter()
            generator.generate_next_token()
            tokens[:, step] = generator.get_next_tokens()
            latencies.append((time.perf_counter() - t0) * 1000.0)
        del generator
        return DecodeRun(tokens=tokens, lengths=[int(new_tokens)] * len(rows),
                         finish_reasons=["length"] * len(rows), ttft_ms=ttft, latencies_ms=latencies)

    def reset(self) -> None:
        super().reset()
        self._generator = None

    def close(self) -> None:
        self.reset()
        self.model = None


@register_runtime
class OrtGenAIRuntime(Runtime):
    """ONNX Runtime GenAI's generation loop on an ORT GenAI folder (``edgesmith export --to genai``)."""

    name = "ortgenai"
    short_name = "genai"
    kinds = ("onnx",)
    decoder_kinds = ("onnx",)
    decoder_session = OrtGenAIDecoderSession
    decoder_hint = "export it as an ORT GenAI folder (edgesmith export MODEL --to genai)"

    def availability(self) -> Availability:
        try:
            og = import_genai()
        except BadInput as exc:
            return Availability(False, str(exc))
        return Availability(True, "", getattr(og, "__version__", "unknown"), ["cpu"])

    def accepts(self, artifact: Artifact) -> bool:
        folder = getattr(artifact, "folder", None)
        return artifact.kind in self.kinds and folder is not None and Path(folder, CONFIG_FILE).is_file()

    def load_artifact(self, source: str | Path) -> Artifact:
        """An ORT GenAI folder as it is, whoever wrote it (ORT GenAI's builder writes contrib ops in
        the default domain that onnx's checker rejects; ORT GenAI loads them): edgesmith's record
        where the folder has one, else the folder with ``genai_config.json``'s facts."""
        folder = Path(source)
        if (folder / META_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            return super().load_artifact(source)
        config = read_genai_config(folder)
        model, graph = config["model"], config["model"]["decoder"]
        decoder = {"layout": "genai", "padding": "right", "vocab_size": int(model["vocab_size"]),
                   "max_positions": int(model["context_length"]), "num_layers": int(graph["num_hidden_layers"]),
                   "num_kv_heads": int(graph["num_key_value_heads"]), "head_dim": int(graph["head_size"]),
                   "eos_token_ids": _ids(config, "eos_token_id"), "bos_token_id": model.get("bos_token_id"),
                   "pad_token_id": (_ids(config, "pad_token_id") or [None])[0]}
        return OnnxModel(task="text-generation", name=folder.name, folder=folder, meta={"decoder": decoder})

    def check_decoder(self, artifact: Artifact) -> None:
        super().check_decoder(artifact)
        genai_folder(artifact)

    def load_decoder_at(self, path: Path, *, threads: int | None = None, **options: Any) -> OrtGenAIDecoderSession:
        """The session on the folder itself (the profiling worker imports no torch for it)."""
        self.check_decoder_options(options)
        return OrtGenAIDecoderSession(Path(path), threads=threads, **options)

    def generation_options(self, artifact: Artifact, prompt_tokens: list[int], new_tokens: int,
                           options: dict[str, Any]) -> dict[str, Any]:
        """Generators hold ``max_length`` positions up front: just what the prompts and new tokens need."""
        context = int(read_genai_config(genai_folder(artifact))["model"]["context_length"])
        check_context(prompt_tokens, new_tokens, context, artifact.name)
        needed = max(max(prompt_tokens), prompt_tokens[0] + new_tokens) + 1
        return {"max_length": min(context, needed), **options}

    def load(self, artifact: Artifact, **options: Any) -> OrtGenAIDecoderSession:
        self.check(artifact)
        return self.load_decoder(artifact, **options)
