"""edgesmith's own decoder artifacts as a benchmark contender (edgesmith's ``.venv``): an ONNX decoder
folder that ``edgesmith export`` / ``edgesmith quantize`` wrote (or a folder of ORT GenAI's builder,
read through its ``genai_config.json``), run by edgesmith's
:class:`~edgesmith.runtimes.onnxruntime.OrtDecoderSession` (KV cache kept in ONNX Runtime through IO
binding, intra-op spinning off, the LM head on the last position during prefill). The one edgesmith
decoder worker: ``llm_peers.py`` and ``llm_backends.py`` both run it.

Greedy and forced-length like every other worker (EOS ignored); TTFT = prefill + the first argmax;
held-out logits with every position's logits from one forward pass.

    .venv/bin/python bench/llm_peer_edgesmith.py measure PROMPTS --model FOLDER --threads 2

edgesmith itself comes from the venv, or from ``PYTHONPATH`` to bench a patched copy (this file puts
nothing of the repository on ``sys.path``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_t0 = time.perf_counter()
import numpy as np
from llm_worker import main

from edgesmith.runtimes.onnxruntime import OrtDecoderSession

IMPORT_S = time.perf_counter() - _t0


def artifact_of(folder: Path):
    """An edgesmith artifact folder, or a builder folder (no edgesmith.json) with its decoder record."""
    from edgesmith.artifacts import META_FILE, OnnxModel, load

    if (folder / META_FILE).exists():
        return load(folder)
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    dec = config["decoder"]
    eos = config["eos_token_id"]
    meta = {"decoder": {"layout": "genai", "padding": "unpadded-only", "num_layers": dec["num_hidden_layers"],
                        "num_kv_heads": dec["num_key_value_heads"], "head_dim": dec["head_size"],
                        "vocab_size": config["vocab_size"], "max_positions": config.get("context_length"),
                        "eos_token_ids": [eos] if isinstance(eos, int) else eos, "logits": "all"}}
    return OnnxModel(task="text-generation", name=folder.name, folder=folder, meta=meta)


class EdgesmithBackend:
    def __init__(self, folder: str, threads: int) -> None:
        self.folder, self.threads = folder, threads
        self.artifact = artifact_of(Path(folder))
        self.session = OrtDecoderSession(self.artifact, threads=threads)

    def info(self) -> dict:
        from importlib import metadata

        quant = self.artifact.meta.get("quantization") or {}
        return {"runtime": "edgesmith onnxruntime", "providers": list(self.session.providers),
                "options": dict(self.session.options), "onnxruntime": metadata.version("onnxruntime"),
                "threads": self.threads, "model": self.folder, "precision": self.artifact.meta.get("precision", "fp32"),
                "method": quant.get("method"), "layout": (self.artifact.meta.get("decoder") or {}).get("layout")}

    def generate(self, ids: list[int], new_tokens: int, mode: str | None):
        self.session.reset()
        stamps = [time.perf_counter()]
        logits = self.session.prefill(np.asarray([ids], dtype=np.int64))
        tokens = [int(logits[0].argmax())]
        stamps.append(time.perf_counter())
        for _ in range(new_tokens - 1):
            logits = self.session.step(np.asarray([tokens[-1]], dtype=np.int64))
            tokens.append(int(logits[0].argmax()))
            stamps.append(time.perf_counter())
        return tokens, stamps

    def logits(self, ids: list[int]):
        return np.asarray(self.session.logits(np.asarray([ids], dtype=np.int64))[0], dtype=np.float32)


def _args(p) -> None:
    p.add_argument("--model", required=True, help="an edgesmith decoder folder (ONNX with a KV cache) or a builder folder")


if __name__ == "__main__":
    sys.exit(main(lambda a: EdgesmithBackend(a.model, a.threads), sys.argv[1:], IMPORT_S, _args))
