"""ONNX Runtime GenAI's own loop on any folder with a ``genai_config.json`` (edgesmith's ``.venv``; no edgesmith).

The worker of every ORT GenAI contender: the builder's INT4 with its defaults (``ortgenai-int4``,
made by ``llm_contenders.genai_builder``: ``python -m onnxruntime_genai.models.builder -i <fp32 folder>
-o <out> -p int4 -e cpu``), or any other folder given as ``--model`` (a second contender is one
``llm_contenders`` entry, or ``--folder KEY=ortgenai:PATH`` on ``llm_peers.py`` / ``llm_backends.py``).
It drives the folder with GenAI's own runtime (``og.Model`` / ``og.Generator``) with
``intra_op_num_threads`` set through a config overlay:

- greedy; ``min_length = max_length`` forces the length (GenAI has no "ignore EOS": its search stops
  at EOS, so EOS is forbidden instead — on this prose the FP32 source never picks EOS in 64 tokens);
- TTFT = ``append_tokens(prompt)`` + the first ``generate_next_token`` / ``get_next_tokens``;
- held-out logits by teacher forcing one token at a time (``get_logits`` is the last position only).

    .venv/bin/python bench/llm_peer_ortgenai.py measure PROMPTS --model FOLDER --threads 2
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_t0 = time.perf_counter()
import llm_worker
import numpy as np
import onnxruntime_genai as og

IMPORT_S = time.perf_counter() - _t0


class GenAIBackend:
    def __init__(self, folder: str, threads: int) -> None:
        self.folder, self.threads = folder, threads
        config = og.Config(folder)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.max_length = json.loads((Path(folder) / "genai_config.json").read_text())["search"].get("max_length")

    def info(self) -> dict:
        from importlib import metadata

        cfg = json.loads((Path(self.folder) / "genai_config.json").read_text())
        return {"runtime": "onnxruntime-genai", "provider": self.model.device_type,
                "onnxruntime_genai": og.__version__, "onnxruntime": metadata.version("onnxruntime"),
                "threads": self.threads, "model": self.folder, "context_length": cfg["model"].get("context_length")}

    def _generator(self, length: int, forced: bool) -> og.Generator:
        params = og.GeneratorParams(self.model)
        options = {"max_length": length, "do_sample": False}
        if forced:
            options["min_length"] = length
        params.set_search_options(**options)
        return og.Generator(self.model, params)

    def generate(self, ids: list[int], new_tokens: int, mode: str | None):
        gen = self._generator(len(ids) + new_tokens, forced=True)
        stamps = [time.perf_counter()]
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        tokens = []
        for _ in range(new_tokens):
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        return tokens, stamps

    def logits(self, ids: list[int]):
        gen = self._generator(len(ids) + 1, forced=False)
        rows = []
        for t in ids:
            gen.append_tokens(np.asarray([t], dtype=np.int32))
            rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
        return np.stack(rows)


def _args(p) -> None:
    p.add_argument("--model", required=True, help="a folder with a genai_config.json (the builder's, or edgesmith's)")


if __name__ == "__main__":
    sys.exit(llm_worker.main(lambda a: GenAIBackend(a.model, a.threads), sys.argv[1:], IMPORT_S, _args))
