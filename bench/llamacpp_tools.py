"""llama.cpp's own command-line tools, built once from the source llama-cpp-python vendors.

The anchor for edgesmith's fast-format quantizer (issue 23) is llama.cpp's best for the same format:
``llama-imatrix`` (an importance matrix from calibration text) and ``llama-quantize --imatrix``.
llama-cpp-python's sdist vendors the llama.cpp source it binds, so the tools come from exactly the
llama.cpp edgesmith runs: the sdist is fetched from PyPI (pip's cache when it is there), unpacked
under ``bench/.cache/llamacpp-tools/``, and the two targets are built with CMake with the same ISA
flags as edgesmith's llama-cpp-python (native minus AMX where AMX is present; bench/llamacpp_env.py).
A stamp keeps the build; later runs are offline. Standard library only.

    python bench/llamacpp_tools.py          # prints the two binaries' paths (builds them first)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

from bench.llamacpp_env import PIN, cmake_args

ROOT = HERE / ".cache" / "llamacpp-tools"
STAMP = ROOT / "stamp.json"
TOOLS = ("llama-imatrix", "llama-quantize")


def _source() -> Path:
    found = sorted(ROOT.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[0]
    ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
                        "-d", tmp, PIN], check=True)
        archive = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(ROOT, filter="data")
    return sorted(ROOT.glob("llama_cpp_python-*/vendor/llama.cpp"))[0]


def ensure() -> dict[str, str]:
    """{tool: path}, building them when the stamp does not match this pin and these flags."""
    wanted = {"pin": PIN, "cmake_args": cmake_args()}
    if STAMP.exists():
        stamp = json.loads(STAMP.read_text())
        if all(stamp.get(k) == v for k, v in wanted.items()) and all(Path(p).exists() for p in stamp["tools"].values()):
            return stamp["tools"]
    src = _source()
    build = ROOT / "build"
    log = ROOT / "build.log"
    with log.open("w") as out:
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        *cmake_args().split()], check=True, stdout=out, stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", "2"], check=True, stdout=out,
                       stderr=subprocess.STDOUT)
    tools = {t: str(next(build.rglob(t))) for t in TOOLS}
    STAMP.write_text(json.dumps({**wanted, "tools": tools}, indent=1) + "\n")
    return tools


if __name__ == "__main__":
    print(json.dumps(ensure(), indent=1))
