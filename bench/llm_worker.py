"""One decoder contender in its own process, measured the same way whatever its runtime.

Standard library (+ numpy) only: the same file drives llama.cpp inside ``bench/.venv-llamacpp``,
Optimum inside ``bench/.venv-optimum`` and PyTorch / ORT GenAI inside edgesmith's ``.venv``.
One process per contender so that its peak RSS (VmHWM) is its own and a crash or a hang stays in
it; the orchestrator (``llm_peers.py``) keeps every worker loaded and sends requests in a
rotating order, so all contenders share the machine's drift.

Protocol: JSON lines. The worker loads the model, then answers on its original stdout (fd 1 is
pointed at stderr while it runs, so a library that prints cannot corrupt the protocol):

- first line: ``{"ready": true, "import_s", "load_s", "rss_mb", "info": {...}}`` or
  ``{"ready": false, "error": "..."}``;
- ``{"op": "generate", "prompt": "128", "new_tokens": 64, "mode": ...}`` →
  ``{"ttft_ms", "token_ms": [...], "tokens": [...], "decode_tps"}``. Greedy (argmax), forced
  length: EOS is ignored. ``ttft_ms`` runs from the call to the moment the first new token id is
  known (prefill + first argmax); ``token_ms[i]`` is the wait for token i + 2 after token i + 1;
  ``decode_tps`` = ``len(token_ms) / sum(token_ms)`` seconds⁻¹ (the mean rate over the run);
  ``cpu_s`` / ``wall_s``: the process's CPU time (all threads) and the wall time of the call — on a
  shared machine ``cpu_s / (wall_s × threads)`` says how much of its cores the contender really got;
- ``{"op": "logits", "prompt": "heldout", "out": PATH}`` → saves the full-vocabulary logits of
  every position as float32 ``[T, V]`` .npy (teacher forcing), answers ``{"path", "shape"}``;
- ``{"op": "stats"}`` → ``{"peak_rss_mb", "rss_mb"}``;  ``{"op": "quit"}``.

``measure(...)`` is the same without an orchestrator: one contender alone, ``rounds`` rounds of
(warm-up, prompt 128, prompt 512), JSON with every raw sample (``python bench/llm_peer_*.py measure``).

A backend implements ``load(args)``, ``info()``, ``generate(ids, new_tokens, mode)`` returning the
tokens and ``time.perf_counter()`` stamps (start, then one per token) and ``logits(ids)``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Protocol


class Backend(Protocol):
    def info(self) -> dict[str, Any]: ...

    def generate(self, ids: list[int], new_tokens: int, mode: str | None) -> tuple[list[int], list[float]]: ...

    def logits(self, ids: list[int]): ...


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def memory() -> dict[str, float | None]:
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return {"peak_rss_mb": hwm / 1024 if hwm else None, "rss_mb": rss / 1024 if rss else None}


def timing(tokens: list[int], stamps: list[float]) -> dict[str, Any]:
    """TTFT, per-token waits and the mean decode rate from perf_counter stamps (start + one per token)."""
    ttft = (stamps[1] - stamps[0]) * 1000.0
    waits = [(b - a) * 1000.0 for a, b in zip(stamps[1:-1], stamps[2:])]
    return {"ttft_ms": ttft, "token_ms": waits, "tokens": [int(t) for t in tokens],
            "decode_tps": len(waits) / (sum(waits) / 1000.0) if waits and sum(waits) > 0 else None}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_generate(backend: Backend, ids: list[int], new_tokens: int, mode: str | None) -> dict[str, Any]:
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    tokens, stamps = backend.generate(ids, new_tokens, mode)
    result = timing(tokens, stamps)
    result.update(cpu_s=cpu_seconds() - cpu0, wall_s=time.perf_counter() - wall0)
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:400] if text else ''}".strip()


def serve(load, prompts_path: str | Path, import_s: float) -> int:
    """Load a backend with ``load()`` and answer requests on stdin until ``quit`` or EOF."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed from now on goes to stderr
    sys.stdout = sys.stderr

    def say(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    prompts = json.loads(Path(prompts_path).read_text())["prompts"]
    try:
        t0 = time.perf_counter()
        backend = load()
        load_s = time.perf_counter() - t0
    except Exception as exc:
        traceback.print_exc()
        say({"ready": False, "error": _first_line(exc)})
        return 1
    say({"ready": True, "import_s": import_s, "load_s": load_s, "info": backend.info(), **memory()})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "quit":
                say({"ok": True})
                return 0
            if op == "stats":
                say(memory())
            elif op == "generate":
                say(timed_generate(backend, prompts[req["prompt"]], int(req["new_tokens"]), req.get("mode")))
            elif op == "logits":
                import numpy as np

                logits = np.asarray(backend.logits(prompts[req["prompt"]]), dtype=np.float32)
                np.save(req["out"], logits)
                say({"path": req["out"], "shape": list(logits.shape)})
            else:
                say({"error": f"unknown op {op!r}"})
        except Exception as exc:
            traceback.print_exc()
            say({"error": _first_line(exc)})
    return 0


def measure(load, prompts_path: str | Path, *, import_s: float, new_tokens: int, rounds: int,
            warmup_tokens: int = 8, lengths: tuple[str, ...] = ("128", "512"), mode: str | None = None,
            logits_out: str | None = None) -> dict[str, Any]:
    """One contender on its own: load, ``rounds`` × (warm-up, one generation per prompt length), stats."""
    prompts = json.loads(Path(prompts_path).read_text())["prompts"]
    t0 = time.perf_counter()
    backend = load()
    result: dict[str, Any] = {"import_s": import_s, "load_s": time.perf_counter() - t0, "info": backend.info(),
                              "load_rss_mb": memory()["rss_mb"], "new_tokens": new_tokens, "mode": mode,
                              "runs": {n: [] for n in lengths}, "load_average": [list(os.getloadavg())]}
    for _ in range(rounds):
        backend.generate(prompts[lengths[0]], warmup_tokens, mode)
        for n in lengths:
            result["runs"][n].append(timed_generate(backend, prompts[n], new_tokens, mode))
        result["load_average"].append(list(os.getloadavg()))
    result.update(memory())
    if logits_out:
        import numpy as np

        logits = np.asarray(backend.logits(prompts["heldout"]), dtype=np.float32)
        np.save(logits_out, logits)
        result["logits"] = {"path": logits_out, "shape": list(logits.shape)}
    return result


def main(load, argv: list[str], import_s: float, add_args=None) -> int:
    """The CLI every peer script shares: ``serve PROMPTS`` or ``measure PROMPTS [--rounds ...]``.

    ``add_args(parser)`` adds the backend's own options (model path, threads); ``load`` is called
    with the parsed namespace and returns a backend.
    """
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["serve", "measure"])
    p.add_argument("prompts", help="prompts.json (token ids; see llm_sources.prompts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", default=None)
    p.add_argument("--logits-out", default=None, help="measure: save the held-out passage's logits here (.npy)")
    p.add_argument("--out", default=None, help="measure: write the JSON here instead of stdout")
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    if args.command == "serve":
        return serve(lambda: load(args), args.prompts, import_s)
    result = measure(lambda: load(args), args.prompts, import_s=import_s, new_tokens=args.new_tokens,
                     rounds=args.rounds, mode=args.mode, logits_out=args.logits_out)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0
