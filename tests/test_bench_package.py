"""bench/ is one package: every module imports (its siblings as ``bench.X``), and the one-way plumbing
holds — one rounds implementation, one machine record, one results writer, one edgesmith decoder worker."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.append(str(REPO))

#: decoder worker scripts import ``llm_worker`` (and a sibling worker) flat, from the script's own folder,
#: so that a foreign venv (llama.cpp's, Optimum's) needs nothing of the repository; they run as scripts
FLAT_OK = {"llm_worker", "llm_peer_torch"}


def is_worker_script(path: Path) -> bool:
    text = path.read_text()
    return "import llm_worker" in text or "from llm_worker" in text or "optimum" in path.stem and "side" in path.stem


def modules() -> list[str]:
    names = [p.stem for p in sorted(BENCH.glob("*.py")) if p.stem != "__init__" and not is_worker_script(p)]
    return names + [f"core.{p.stem}" for p in sorted((BENCH / "core").glob("*.py")) if p.stem != "__init__"]


@pytest.mark.parametrize("name", modules())
def test_every_module_imports_as_part_of_the_package(name):
    importlib.import_module(f"bench.{name}")


def test_siblings_are_imported_through_the_package():
    siblings = {p.stem for p in BENCH.glob("*.py")}
    for path in [*BENCH.glob("*.py"), *(BENCH / "core").glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            flat = [n for n in names if n.split(".")[0] in siblings and n.split(".")[0] not in FLAT_OK]
            assert not flat, f"{path.name}:{node.lineno} imports {flat} flat; use `from bench import ...`"


def test_one_of_each():
    texts = {p.name: p.read_text() for p in BENCH.glob("*.py")}
    assert not (BENCH / "rounds.py").exists()
    for name, text in texts.items():
        for own in ("def rotation(", "def run_rounds(", "def median_ci(", "def paired_speedup(", "def _bootstrap"):
            assert own not in text, f"{name} has its own {own[4:-1]}: use bench.core.rounds / edgesmith.stats"
        if name != "llm_worker.py":  # standard library only: it runs inside foreign venvs
            assert "/proc/loadavg" not in text and "getloadavg" not in text, f"{name}: use bench.core.machine"
    # one edgesmith decoder worker: no other contender module wraps edgesmith's decoder session
    contenders = {n: t for n, t in texts.items() if n.startswith("llm_peer_") or n in ("llm_backends.py", "llm_peers.py")}
    assert [n for n, t in contenders.items() if "import OrtDecoderSession" in t] == ["llm_peer_edgesmith.py"]
