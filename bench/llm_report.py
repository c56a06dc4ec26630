"""The decoder peers' table (``bench/results/llm_peers.md``) from a results document of ``llm_peers.py``."""

from __future__ import annotations

from typing import Any

from bench.core import machine as machine_record

REFERENCE = "torch-fp32"
#: a run counts as uncontended when the contender's process got at least this share of its threads' cores
FULL_SHARE = 0.85


def fmt_ci(triple: list[float] | None, digits: int = 0, best: float | None = None) -> str:
    if not triple:
        return "-"
    m, lo, hi = triple
    text = f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"
    return text + (f", best {best:.{digits}f}" if best is not None else "")


def markdown(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    lengths = [str(n) for n in s["lengths"]]
    first = lengths[0]
    head = ["contender", "status", f"decode tok/s @{first} [95% CI]", "× PyTorch decode [95% CI]"]
    head += [f"TTFT @{n} ms [95% CI]" for n in lengths]
    head += ["size MB", "peak RSS MB", "load s", f"greedy = FP32 ({s['new_tokens']} tok @{first})",
             "load avg in its runs"]
    with_q = any(r.get("quality") for r in doc["contenders"].values())
    if with_q:
        head += ["KL to FP32", "top-1", "ppl"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for key, r in doc["contenders"].items():
        sm = r.get("summary", {})
        ag = (r.get("agreement") or {}).get(first)
        cells = [r["label"], "" if r["status"] == "ok" else r["status"],
                 fmt_ci((sm.get(first) or {}).get("decode_tps"), 1, (sm.get(first) or {}).get("best_decode_tps")),
                 "1.00x (reference)" if key == REFERENCE else (
                     "{:.2f}x [{:.2f}–{:.2f}]".format(*sm[first]["decode_vs_torch"])
                     if (sm.get(first) or {}).get("decode_vs_torch") else "-")]
        cells += [fmt_ci((sm.get(n) or {}).get("ttft_ms"), 0, (sm.get(n) or {}).get("best_ttft_ms")) for n in lengths]
        cells += [f"{r['size_bytes'] / 1e6:.0f}" if r.get("size_bytes") else "-",
                  f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-",
                  f"{r['load_s']:.2f}" if r.get("load_s") is not None else "-",
                  ("reference" if key == REFERENCE else
                   f"{ag['identical_prefix']}/{ag['of']} identical prefix, {ag['matches']}/{ag['of']} equal")
                  if ag else "-",
                  "{:.1f}–{:.1f}".format(min(ld), max(ld)) if (ld := [x for e in sm.values() for x in e["load1"]]) else "-"]
        if with_q:
            q = r.get("quality") or {}
            cells += [f"{q['kld']:.4f}" if q else "-", f"{q['top1']:.3f}" if q else "-",
                      f"{q['ppl']:.2f}" if q else "-"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if any("uncontended" in (r.get("summary", {}).get(first) or {}) for r in doc["contenders"].values()):
        uhead = ["contender", f"decode tok/s @{first}"] + [f"TTFT @{n} ms" for n in lengths] + ["runs (of all)"]
        ulines = ["| " + " | ".join(uhead) + " |", "|---|" + "---:|" * (len(uhead) - 1)]
        for key, r in doc["contenders"].items():
            sm = r.get("summary", {})
            u = {n: (sm.get(n) or {}).get("uncontended") or {} for n in lengths}
            if not any(u.values()):
                continue
            cells = [r["label"], f"{u[first]['decode_tps']:.1f}" if u[first].get("decode_tps") else "-"]
            cells += [f"{u[n]['ttft_ms']:.0f}" if u[n].get("ttft_ms") else "-" for n in lengths]
            cells.append(", ".join(f"@{n}: {u[n].get('runs', 0)}/{(sm.get(n) or {}).get('rounds', 0)}" for n in lengths))
            ulines.append("| " + " | ".join(cells) + " |")
        uncontended = ["", f"Only the runs in which the contender's process got at least {FULL_SHARE:.0%} of its "
                       f"{s['threads']} threads' cores (CPU time ÷ (wall time × threads); other jobs shared the "
                       "machine), medians:", "", *ulines]
    else:
        uncontended = []
    la = doc["load_average"]
    notes = [f"- `{k}`: " + "; ".join(r["notes"]) for k, r in doc["contenders"].items() if r.get("notes")]
    if "GGML_AMX_INT8=OFF" in str(doc["versions"].get("cmake_args")):
        notes.append("- llama.cpp is built without its AMX kernels on this AMX CPU: a native build's AMX path crashes "
                     "(SIGSEGV in `llama_decode`) on every batch of more than one token here, for Q4_1, Q4_0, Q8_0 "
                     "and Q4_K_M alike (llama.cpp #20824); see `bench/llamacpp_env.py`")
    return "\n".join([
        "# Decoder peers: SmolLM2-135M-Instruct on the CPU",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {m['cpu_model']} ({machine_record.isa_of(m)}), {m['cores']} logical cores, threads = {s['threads']} for every contender; "
        f"load average (1 min) at start {la['start'][0]:.2f}, end {la['end'][0]:.2f}, "
        f"during the rounds {min(la['rounds']):.2f}–{max(la['rounds']):.2f} (this benchmark's own 2 threads "
        "count ~2)" + _contention_line(doc) + ".",
        f"{s['rounds']} rounds in a rotating order, each a warm-up of {s['warmup_tokens']} tokens then one greedy "
        f"generation of {s['new_tokens']} new tokens (EOS ignored) per prompt length ({', '.join(lengths)} tokens "
        "of held-out corpus text, the same token ids for everyone). Medians over rounds with 95 % bootstrap "
        "intervals, and the best round (on a shared machine: what the runtime does when it gets the cores); "
        "× PyTorch is the per-round ratio of median per-token latencies. "
        f"llama.cpp: llama-cpp-python {doc['versions'].get('llama-cpp-python', '?')}, built with "
        f"`{doc['versions'].get('cmake_args', '?')}`.",
        "",
        *lines,
        *uncontended,
        "",
        *(["Notes:", *notes, ""] if notes else []),
    ])


def _contention_line(doc: dict[str, Any]) -> str:
    """How many timed runs did not get their cores (CPU share below FULL_SHARE), when measured."""
    shares = [sh for r in doc["contenders"].values() for e in (r.get("summary") or {}).values()
              for sh in e.get("cpu_share", []) if sh is not None]
    if not shares:
        return ""
    low = sum(sh < FULL_SHARE for sh in shares)
    text = f"; {low} of {len(shares)} timed runs got less than {FULL_SHARE:.0%} of their cores (other jobs)"
    return text + (" — **mostly contended: absolute numbers are low and noisy**" if low > len(shares) / 2 else "")
