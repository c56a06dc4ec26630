"""llama.cpp's own virtual environment, ``bench/.venv-llamacpp`` (git-ignored), built once.

llama-cpp-python has no wheel on PyPI: ``pip install`` compiles llama.cpp from source with CMake
and g++ (about 10 minutes on our 2 cores). It gets a venv of its own, like Optimum's, so that a
compile flag or its numpy/jinja pins never touch edgesmith's ``.venv``, and so that the decoder
benchmark measures llama.cpp as its users build it: ``CMAKE_ARGS="-DGGML_NATIVE=ON"`` (kernels for
this CPU's AVX2/FMA; no BLAS, which llama.cpp only uses for large prefill batches anyway).

One exception, measured on our 2-core Xeon VM (AVX-512 + AMX): a native build there compiles
llama.cpp's AMX kernels, and every batch of more than one token (any prompt) crashes with SIGSEGV
inside ``llama_decode`` for Q4_1, Q4_0, Q8_0 and Q4_K_M alike (single-token decode works; the F32
file, which AMX does not take, works). It is a known machine-dependent crash (llama.cpp #20824,
"segfault in ggml_backend_amx_mul_mat"; dspy #10079 and ollama #17006 hit it on Sapphire Rapids
runners and VMs). So when /proc/cpuinfo lists AMX, the build is "native minus AMX":
``GGML_NATIVE=OFF`` with every other ISA flag of this CPU switched on explicitly.

The compile log is kept in ``bench/.cache/llamacpp-build.log`` (a failed build says why there).
A stamp records the resolved versions and the CMake arguments; once it exists nothing is fetched
again, so the benchmark runs offline. Runs with the standard library only (the harness imports it;
it never runs inside that venv).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import venv
from pathlib import Path

log = logging.getLogger("bench.llamacpp_env")

BENCH_DIR = Path(__file__).resolve().parent
#: EDGESMITH_BENCH_LLAMACPP_VENV moves it (a test can point it at a folder that must stay absent)
VENV_DIR = Path(os.environ.get("EDGESMITH_BENCH_LLAMACPP_VENV") or BENCH_DIR / ".venv-llamacpp")
STAMP = VENV_DIR / ".installed.json"
LOG_FILE = BENCH_DIR / ".cache" / "llamacpp-build.log"
PIN = "llama-cpp-python==0.3.36"
NATIVE_ARGS = "-DGGML_NATIVE=ON"
#: /proc/cpuinfo flag → the ggml CMake option that enables it when GGML_NATIVE is off
ISA_OPTIONS = (("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
               ("bmi2", "GGML_BMI2"), ("avx_vnni", "GGML_AVX_VNNI"), ("avx512f", "GGML_AVX512"),
               ("avx512vbmi", "GGML_AVX512_VBMI"), ("avx512_vnni", "GGML_AVX512_VNNI"),
               ("avx512_bf16", "GGML_AVX512_BF16"))
#: the peer runner also needs numpy (already a llama-cpp-python dependency) and psutil-free RSS
#: (it reads /proc), so nothing else is installed
REPORTED = ("llama-cpp-python", "numpy")


def python() -> Path:
    return VENV_DIR / "bin" / "python"


def cpu() -> tuple[str, set[str]]:
    """This CPU's model name and flags (empty when /proc/cpuinfo cannot be read)."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def cmake_args(flags: set[str] | None = None) -> str:
    """``-DGGML_NATIVE=ON``, or native minus AMX on a CPU with AMX (see the module docstring)."""
    flags = cpu()[1] if flags is None else flags
    if not any(f.startswith("amx") for f in flags):
        return NATIVE_ARGS
    on = [f"-D{opt}=ON" for flag, opt in ISA_OPTIONS if flag in flags]
    off = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return " ".join(["-DGGML_NATIVE=OFF", *on, *off])


def _wanted() -> dict[str, str]:
    return {"pin": PIN, "cmake_args": cmake_args(), "cpu": cpu()[0]}


def is_ready() -> bool:
    """Built, for this pin, these CMake arguments and this CPU model (a native build is CPU-bound)."""
    if not (STAMP.exists() and python().exists()):
        return False
    stamp = json.loads(STAMP.read_text())
    return all(stamp.get(k) == v for k, v in _wanted().items())


def resolved_versions() -> dict[str, str | None]:
    """Versions installed in the llama.cpp venv, read by its own interpreter."""
    code = ("import json; from importlib import metadata as m\n"
            "out = {}\n"
            f"for d in {list(REPORTED)!r}:\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: out[d] = None\n"
            "import llama_cpp\n"
            "out['system_info'] = llama_cpp.llama_print_system_info().decode().strip()\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python()), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def ensure() -> dict[str, str | None]:
    """Create the venv and compile llama-cpp-python when the stamp is missing; return versions."""
    if is_ready():
        return json.loads(STAMP.read_text())
    if not python().exists():
        log.info("creating %s", VENV_DIR)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV_DIR)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    wanted = _wanted()
    env = dict(os.environ, CMAKE_ARGS=wanted["cmake_args"], FORCE_CMAKE="1",
               CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    cmd = [str(python()), "-m", "pip", "install", "--verbose", "--no-cache-dir", PIN]
    if STAMP.exists():  # built before with other arguments or on another CPU: compile llama.cpp again
        cmd[-1:] = ["--force-reinstall", "--no-deps", PIN]
    log.info("compiling %s with CMAKE_ARGS=%r (~10-15 min on 2 cores); log: %s", PIN, wanted["cmake_args"], LOG_FILE)
    with LOG_FILE.open("w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = LOG_FILE.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"llama-cpp-python failed to build (exit {done.returncode}); see {LOG_FILE}:\n"
                           + "\n".join(tail))
    versions = {**resolved_versions(), **wanted}
    STAMP.write_text(json.dumps(versions, indent=2) + "\n")
    log.info("llama.cpp venv ready: %s", versions)
    return versions


if __name__ == "__main__":
    if sys.argv[1:] == ["--cmake-args"]:  # the Makefile builds edgesmith's own llama-cpp-python with these
        print(cmake_args())
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(ensure(), indent=2))
    sys.exit(0)
