"""llama.cpp through llama-cpp-python: the decoder peer. Runs INSIDE ``bench/.venv-llamacpp``; no edgesmith.

Two modes on one loaded ``Llama`` (threads = ``n_threads`` = ``n_threads_batch``; library defaults
otherwise: ``n_batch``/``n_ubatch`` 512, flash attention off, mmap on):

- ``loop`` (default): ``Llama.eval(prompt)``, then the last position's logits read through the
  low-level context (``llama_get_logits_ith(ctx, -1)``) and ``argmax``; then ``eval([token])`` per
  step. ``Llama.eval`` alone leaves ``scores`` empty unless ``logits_all=True`` (FIELD-NOTES trap:
  reading ``scores`` gives argmax 0), and ``logits_all=True`` would run the LM head on every
  prompt position and slow prefill — so the logits come from the context.
- ``generate``: ``Llama.generate(tokens, top_k=1, temp=0)``, the high-level iterator with
  llama.cpp's own sampler chain (what a llama-cpp-python user writes); it never stops by itself,
  so taking ``new_tokens`` items forces the length and EOS is ignored. ``reset()`` first, or it
  would reuse the KV cache of a previous identical prompt and TTFT would lie.

``--no-extra-bufts`` keeps weights out of llama.cpp's AMX and CPU-repack buffers (a workaround
for a build whose AMX kernels crash; the benchmark builds without AMX instead, llamacpp_env.py).

Held-out logits: one batch with every position's logits flag set, read from the context (the
same as ``logits_all=True`` for that one call).

``quantize SRC DST --type q8_0|q4_k_m|q4_0|...`` is llama.cpp's own quantizer
(``llama_model_quantize``); SRC must be F32/F16 (``llm_sources.f32_gguf``) unless
``--allow-requantize`` (llama-quantize's flag of that name: it quantizes already-quantized
tensors again, so errors add up).

    bench/.venv-llamacpp/bin/python bench/llm_peer_llamacpp.py measure PROMPTS --model X.gguf --threads 2
    bench/.venv-llamacpp/bin/python bench/llm_peer_llamacpp.py quantize F32.gguf Q8_0.gguf --type q8_0
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_t0 = time.perf_counter()
import llama_cpp
import llm_worker
import numpy as np

IMPORT_S = time.perf_counter() - _t0

FTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
          "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1", "q4_k_s": "MOSTLY_Q4_K_S",
          "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


def quantize(src: str, dst: str, qtype: str, *, threads: int = 2, allow_requantize: bool = False) -> dict:
    """llama.cpp's quantizer, ``src`` → ``dst`` at ``qtype`` (``llama-quantize`` without the CLI)."""
    key = qtype.lower()
    if key not in FTYPES:
        raise SystemExit(f"--type {qtype}: unknown; one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + FTYPES[key])
    params.nthread = threads
    params.allow_requantize = allow_requantize
    tmp = dst + ".tmp"
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} → {qtype}) returned {rc}")
    Path(tmp).replace(dst)
    return {"src": src, "dst": dst, "type": key, "seconds": time.perf_counter() - t0,
            "allow_requantize": allow_requantize, "size_bytes": Path(dst).stat().st_size}


def _load(path: str, *, extra_bufts: bool, **kwargs) -> llama_cpp.Llama:
    """``Llama(...)``; ``extra_bufts=False`` keeps weights out of the AMX and CPU-repack buffers.

    ``Llama`` has no argument for ``llama_model_params.use_extra_bufts`` (llama-cli's
    ``--no-extra-bufts``), so the default-params factory it calls is wrapped for this one call.
    """
    if extra_bufts:
        return llama_cpp.Llama(model_path=path, **kwargs)
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=path, **kwargs)
    finally:
        low.llama_model_default_params = original


class LlamaCppBackend:
    def __init__(self, path: str, threads: int, n_ctx: int, flash_attn: bool, extra_bufts: bool = True) -> None:
        self.path, self.threads, self.flash_attn, self.extra_bufts = path, threads, flash_attn, extra_bufts
        self.llm = _load(path, extra_bufts=extra_bufts, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         flash_attn=flash_attn, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def info(self) -> dict:
        from importlib import metadata

        return {"runtime": "llama.cpp", "provider": "cpu", "llama_cpp_python": metadata.version("llama-cpp-python"),
                "system_info": llama_cpp.llama_print_system_info().decode().strip(), "threads": self.threads,
                "model": self.path, "n_ctx": self.llm.n_ctx(), "n_batch": self.llm.n_batch,
                "flash_attn": self.flash_attn, "extra_bufts": self.extra_bufts,
                "file_type": self.llm.metadata.get("general.file_type")}

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def generate(self, ids: list[int], new_tokens: int, mode: str | None):
        llm = self.llm
        llm.reset()
        if (mode or "loop") == "generate":
            stamps, tokens = [time.perf_counter()], []
            for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                tokens.append(int(tok))
                stamps.append(time.perf_counter())
                if len(tokens) == new_tokens:
                    break
            return tokens, stamps
        stamps = [time.perf_counter()]
        llm.eval(ids)
        tok = int(np.argmax(self._last_logits()))
        tokens = [tok]
        stamps.append(time.perf_counter())
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(self._last_logits()))
            tokens.append(tok)
            stamps.append(time.perf_counter())
        return tokens, stamps

    def logits(self, ids: list[int]) -> np.ndarray:
        llm = self.llm
        if len(ids) > llm.n_batch:
            raise ValueError(f"held-out passage of {len(ids)} tokens exceeds n_batch {llm.n_batch}")
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm._batch.set_batch(batch=ids, n_past=0, logits_all=True)
        llm._ctx.decode(llm._batch)
        out = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(ids), self.n_vocab)).copy()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.reset()
        return out


def _n_ctx(prompts_path: str, new_tokens: int) -> int:
    longest = max(len(v) for v in json.loads(Path(prompts_path).read_text())["prompts"].values())
    return max(1024, longest + new_tokens + 64)


def _args(p) -> None:
    p.add_argument("--model", required=True, help="GGUF file")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (off by default)")
    p.add_argument("--no-extra-bufts", action="store_true",
                   help="no AMX / CPU-repack weight buffers (llama-cli --no-extra-bufts; a workaround for a build "
                        "with AMX kernels that crash, see llamacpp_env.py)")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "quantize":
        import argparse

        p = argparse.ArgumentParser(prog="llm_peer_llamacpp.py quantize")
        p.add_argument("cmd")
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--type", required=True)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--allow-requantize", action="store_true")
        a = p.parse_args(argv)
        print(json.dumps(quantize(a.src, a.dst, a.type, threads=a.threads, allow_requantize=a.allow_requantize)))
        return 0
    return llm_worker.main(lambda a: LlamaCppBackend(a.model, a.threads, _n_ctx(a.prompts, a.new_tokens),
                                                     a.flash_attn, not a.no_extra_bufts), argv, IMPORT_S, _args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
