"""Optimum's ``ORTModelForCausalLM``, a decoder peer. Runs INSIDE ``bench/.venv-optimum``; no edgesmith.

optimum-onnx pins ``transformers<4.58`` (4.57 in that venv), so it cannot read a GGUF; it gets the
plain FP32 safetensors folder that ``llm_sources.fp32_folder`` wrote with transformers 5. One
incompatibility is handled, not hidden: transformers 5 writes RoPE as ``rope_parameters:
{rope_theta: 100000}`` and 4.57 does not read that key — it would silently fall back to
``rope_theta = 10000`` and export a different model. ``export`` therefore writes a compatible
copy of the config (``rope_theta`` at the top level, weights linked) and says so in its JSON.

``export FP32_FOLDER OUT``: ``ORTModelForCausalLM.from_pretrained(export=True, use_cache=True)``,
``save_pretrained``, then a check inside this venv: the ONNX model's logits and 16 greedy tokens
against transformers 4.57's PyTorch model of the same folder. Prints one JSON line (``ok`` false
with the error when the export fails).

``serve`` / ``measure``: the exported folder with ONNX Runtime (``intra_op_num_threads`` set),
driven by Hugging Face ``generate`` (greedy, ``eos_token_id=None`` so EOS does not stop it), a
streamer stamping each token — what an Optimum user runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

_t0 = time.perf_counter()
import llm_worker
import numpy as np
import torch
from llm_peer_torch import _Stamps

IMPORT_S = time.perf_counter() - _t0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def compatible_copy(folder: Path, dest: Path) -> tuple[Path, list[str]]:
    """``folder`` as transformers 4.57 reads it: top-level ``rope_theta``; weights and tokenizer linked."""
    config = json.loads((folder / "config.json").read_text())
    changes = []
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
        changes.append(f"rope_parameters.rope_theta → rope_theta = {rope['rope_theta']}")
    if not changes:
        return folder, changes
    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        target = dest / f.name
        if f.name != "config.json" and not target.exists():
            os.symlink(f.resolve(), target)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest, changes


def _session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def export(folder: Path, out: Path) -> dict:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    result: dict = {"ok": False, "folder": str(out)}
    if (out / "model.onnx").exists() and (out / "export.json").exists():
        return json.loads((out / "export.json").read_text())
    try:
        src, changes = compatible_copy(folder, out.with_name(out.name + "-src"))
        result["config_changes"] = changes
        t0 = time.perf_counter()
        model = ORTModelForCausalLM.from_pretrained(str(src), export=True, use_cache=True)
        model.save_pretrained(str(out))
        for name in TOKENIZER_FILES:  # copied: transformers 4.57 cannot load a tokenizer saved by 5 (TokenizersBackend)
            if (src / name).exists():
                shutil.copy2(src / name, out / name)
        result["export_s"] = time.perf_counter() - t0
        result["files"] = sorted(p.name for p in out.iterdir())
        # check against transformers 4.57's own PyTorch model of the same folder
        ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        ids = torch.tensor([[551, 41536, 30, 260, 4197, 436, 253, 915, 14653, 30] * 4])
        with torch.inference_mode():
            a = ref(input_ids=ids).logits.numpy()
            b = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            b = b.numpy() if hasattr(b, "numpy") else np.asarray(b)
            g_ref = ref.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2)
            g_ort = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2)
        result["max_abs_logit_diff"] = float(np.abs(a - b).max())
        result["greedy_equal"] = bool(torch.equal(g_ref, g_ort))
        result["ok"] = True
        (out / "export.json").write_text(json.dumps(result) + "\n")
    except Exception as exc:
        traceback.print_exc()
        text = str(exc).strip().splitlines()
        result["error"] = f"{type(exc).__name__}: {text[0][:400] if text else ''}"
    return result


class OptimumBackend:
    def __init__(self, folder: str, threads: int) -> None:
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(threads)
        self.folder, self.threads = folder, threads
        self.model = ORTModelForCausalLM.from_pretrained(folder, session_options=_session_options(threads),
                                                         provider="CPUExecutionProvider")

    def info(self) -> dict:
        from importlib import metadata

        return {"runtime": "optimum-onnxruntime", "provider": list(self.model.providers)[0],
                "optimum_onnx": metadata.version("optimum-onnx"), "transformers": metadata.version("transformers"),
                "onnxruntime": metadata.version("onnxruntime"), "threads": self.threads, "model": self.folder}

    def generate(self, ids: list[int], new_tokens: int, mode: str | None):
        prompt = torch.tensor([ids], dtype=torch.long)
        streamer = _Stamps()
        start = time.perf_counter()
        self.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=0, eos_token_id=None, pad_token_id=2, streamer=streamer)
        return streamer.tokens, [start] + streamer.stamps

    def logits(self, ids: list[int]):
        prompt = torch.tensor([ids], dtype=torch.long)
        out = self.model(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits
        out = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        return out[0]


def _args(p) -> None:
    p.add_argument("--model", required=True, help="a folder `export` wrote")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "export":
        res = export(Path(sys.argv[2]), Path(sys.argv[3]))
        print(json.dumps(res))
        sys.exit(0 if res.get("ok") else 1)
    sys.exit(llm_worker.main(lambda a: OptimumBackend(a.model, a.threads), sys.argv[1:], IMPORT_S, _args))
