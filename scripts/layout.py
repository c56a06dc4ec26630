"""Print README's Layout section from the tree: every module of edgesmith/, by layer, with the first
line of its docstring. `python scripts/layout.py --write` replaces the section in README.md;
tests/test_layers.py checks that the README lists every module."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_layers import PACKAGE, layer_of, modules

LAYER_NAMES = {
    0: "L0 foundations: errors, files, cache, data, schema helpers, statistics",
    1: "L1 artifacts and model facts",
    2: "L2 contracts and engines: the pass contract and registry, runtimes, the training loop",
    3: "L3 measuring and reporting",
    4: "L4 the passes",
    5: "L5 orchestration",
    6: "L6 sweeps",
    7: "L7 the CLI and the package root",
}
BEGIN, END = "<!-- layout: begin (scripts/layout.py) -->", "<!-- layout: end -->"


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    first = re.split(r"(?<=[.:;])\s", first)[0].rstrip(".:;")
    return first[:110]


def section() -> str:
    mods = modules()
    lines = [BEGIN, "", "Every import points to its own layer or below (`tests/test_layers.py` checks each one, "
             "inside functions too). Regenerate this list with `python scripts/layout.py --write`. The same test "
             "holds two more rules: outside the runtimes' own modules (`edgesmith/runtimes/` and the modules the "
             "runtime tables in `runtimes/base.py` name) nothing probes a session with `getattr` (capabilities are "
             "declared on `Session`, `DecoderSession` and `Runtime`), and outside those and `edgesmith/cli/` no code "
             "uses a runtime's name as one (it asks the runtime). A new decoder runtime is one module under "
             "`edgesmith/runtimes/` (its `DecoderSession` with `OPTIONS`/`MAX_BATCH`, its `Runtime` with "
             "`decoder_kinds` and `decoder_session`) and one `BUILTIN_RUNTIMES` line.", ""]
    for layer in range(8):
        names = sorted(m for m in mods if layer_of(m) == layer)
        if not names:
            continue
        lines += [f"**{LAYER_NAMES[layer]}**", "", "| module | what it holds |", "|---|---|"]
        for name in names:
            rel = mods[name].relative_to(PACKAGE.parent)
            lines.append(f"| `{rel}` | {summary(mods[name]).replace('|', '/')} |")
        lines.append("")
    lines += ["Outside the package: `recipes/` (recipes that run as they are), `bench/` (side-by-side benchmarks, "
              "BENCHMARKS.md), `profiles/` (recorded profiles), `scripts/`, `tests/`.", "", END]
    return "\n".join(lines)


def main() -> None:
    text = section()
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        current = readme.read_text()
        if BEGIN in current:
            start, end = current.index(BEGIN), current.index(END) + len(END)
            readme.write_text(current[:start] + text + current[end:])
        else:
            start = current.index("## Layout")
            nxt = current.find("\n## ", start + 1)
            tail = current[nxt:] if nxt != -1 else "\n"
            readme.write_text(current[:start] + "## Layout\n\n" + text + "\n" + tail)
    else:
        print(text)


if __name__ == "__main__":
    main()
