"""ONNX Runtime GenAI, the model builder's INT4 with its defaults (edgesmith's ``.venv``; no edgesmith).

``build(fp32_folder, out)`` runs what a GenAI user runs, ``python -m onnxruntime_genai.models.builder
-i <fp32 folder> -o <out> -p int4 -e cpu`` (GroupQueryAttention, MatMulNBits INT4 block 32 RTN,
LM head INT4; under a minute). The worker then drives it with GenAI's own runtime
(``og.Model`` / ``og.Generator``) with ``intra_op_num_threads`` set through a config overlay:

- greedy; ``min_length = max_length`` forces the length (GenAI has no "ignore EOS": its search stops
  at EOS, so EOS is forbidden instead — on this prose the FP32 source never picks EOS in 64 tokens);
- TTFT = ``append_tokens(prompt)`` + the first ``generate_next_token`` / ``get_next_tokens``;
- held-out logits by teacher forcing one token at a time (``get_logits`` is the last position only).

    .venv/bin/python bench/llm_peer_ortgenai.py build FP32_FOLDER OUT
    .venv/bin/python bench/llm_peer_ortgenai.py measure PROMPTS --model OUT --threads 2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

_t0 = time.perf_counter()
import llm_worker
import numpy as np
import onnxruntime_genai as og

IMPORT_S = time.perf_counter() - _t0


def build(fp32_folder: str | Path, out: str | Path, *, precision: str = "int4", timeout: int = 1800) -> dict:
    """Run the builder with its defaults into ``out`` (skipped when ``out/genai_config.json`` exists)."""
    out = Path(out)
    if (out / "genai_config.json").exists():
        return {"folder": str(out), "seconds": None, "cached": True}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(fp32_folder), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + ".build-cache"))]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    (out.parent / f"{out.name}.build.log").write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0 or not (out / "genai_config.json").exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"ORT GenAI builder failed (exit {done.returncode}): {tail[:300]}")
    return {"folder": str(out), "seconds": seconds, "cached": False, "command": " ".join(cmd[1:])}


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
                "threads": self.threads, "model": self.folder,
                "builder_precision": "int4", "context_length": cfg["model"].get("context_length")}

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
    p.add_argument("--model", required=True, help="a folder the ORT GenAI builder wrote")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "build":
        print(json.dumps(build(sys.argv[2], sys.argv[3])))
        sys.exit(0)
    sys.exit(llm_worker.main(lambda a: GenAIBackend(a.model, a.threads), sys.argv[1:], IMPORT_S, _args))
