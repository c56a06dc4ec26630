"""The one machine record every benchmark writes: CPU model and ISA, cores, threads, OS, library
versions (edgesmith's environment fingerprint, built on the device agent's stdlib functions) and
the load average at the start and at the end of the run.

    rec = machine.record(threads=2)         # at the start
    ...                                      # measure
    machine.finish(rec)                      # load at the end
    machine.line(rec)                        # the sentence every table carries
"""

from __future__ import annotations

import os
from typing import Any

#: the ISA flags and their short name are the device agent's (the same record on a device over ssh)
from edgesmith.profiling.agent import ISA_FLAGS, isa_flags, isa_summary  # noqa: F401 (re-exported)


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - no load average (Windows)
        return []


def record(threads: int | None, **extra: Any) -> dict[str, Any]:
    """The machine as this run starts: fingerprint + ISA + load average at the start; ``extra``
    (a foreign venv's versions, a build's flags) is kept under its own keys."""
    from edgesmith.profiling.environment import fingerprint

    env = fingerprint(threads=threads).model_dump()
    flags = isa_flags()
    return {"cpu_model": env["cpu_model"], "isa": isa_summary(flags), "isa_flags": flags, "cores": env["cores"],
            "threads": threads, "arch": env["machine"], "os": env["os"], "kernel": env["kernel"], "python": env["python"],
            "libraries": env["libraries"], "gpu": env["gpu"],
            "load_average": {"start": load_average(), "end": None}, **extra}


def finish(rec: dict[str, Any]) -> dict[str, Any]:
    """Adds the load average at the end of the run to ``rec`` (and returns it)."""
    rec.setdefault("load_average", {"start": None})["end"] = load_average()
    return rec


def _load_text(load: dict[str, Any] | None) -> str:
    if not load or not load.get("start"):
        return ""
    start, end = load["start"][0], (load.get("end") or [None])[0]
    return f"; load average (1 min) {start:.2f} at the start" + (f", {end:.2f} at the end" if end is not None else "")


def isa_of(rec: dict[str, Any]) -> str:
    """The record's ISA summary; records written before the ISA was part of them say so."""
    return rec.get("isa") or (isa_summary(rec["isa_flags"]) if rec.get("isa_flags") else "ISA not recorded")


def line(rec: dict[str, Any]) -> str:
    """One sentence naming the machine, for the head of every table (older records lack the ISA)."""
    isa = isa_of(rec)
    threads = f", threads {rec['threads']}" if rec.get("threads") else ""
    cores = f", {rec['cores']} logical cores" if rec.get("cores") else ""
    return f"Machine: {rec.get('cpu_model', 'unknown CPU')} ({isa}){cores}{threads}{_load_text(rec.get('load_average'))}."
