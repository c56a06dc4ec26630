"""Nothing lost under faults (issue 27): kill -9 at every step boundary and inside the long steps,
two processes on one cache, tampered cache entries, read-only, vanishing and full folders.

The promise is a database's: a step is either committed whole or leaves no trace, and running the
same command again finishes the work with the same bytes. Kills are deterministic: the
``EDGESMITH_FAULT`` hook (:mod:`edgesmith.faults`) makes the process send itself SIGKILL at a named
point; nothing here waits on a timer. Every run is a real child process (forked from a warm server,
see ``fault_worker.py``), so locks, file descriptors and the kill are the real ones.

Outputs are compared byte for byte with an uninterrupted run's, except what a pass records in its
``edgesmith.json`` about the run rather than the output: wall times and speeds, which no two runs
share, and the step a training resumed from (see ``VOLATILE``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from fault_worker import Outcome, Runner

from edgesmith.storage import sha256_file

TEMP_PREFIXES = (".tmp-", ".old-")


# ---------------------------------------------------------------------------------------------
# The world: tiny models and recipes in a folder any user can read
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tiny_bert_dir, minilm_tokenizer):
    """A folder readable by every user (the permission tests drop root), with a tiny BERT and a tiny
    Llama with its tokenizer, and the recipes run on them."""
    root = Path(tempfile.mkdtemp(prefix="edgesmith-faults-"))
    os.chmod(root, 0o755)
    shutil.copytree(tiny_bert_dir, root / "bert")
    from tiny_lm import tiny_llama, train_tokenizer

    tiny_llama().save_pretrained(root / "llama")
    train_tokenizer(root / "llama")
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    encoder = {"name": "tiny", "model": str(root / "bert"), "data": {"limit": 32},
               "steps": [{"prune": {"heads": 0.5, "check_latency": False, "round_to": 1}},
                         {"export": {"probe_batches": [1], "probe_seq_lengths": [8]}},
                         {"quantize": {"min_cosine": 0.5}}],
               "profile": None}
    (root / "encoder.yaml").write_text(yaml.safe_dump(encoder, sort_keys=False))
    other = {**encoder, "name": "tiny-other", "steps": [*encoder["steps"][:2], {"quantize": {"per_channel": False,
                                                                                           "min_cosine": 0.5}}]}
    (root / "encoder-other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    decoder = {"name": "tinylm", "model": str(root / "llama"), "data": {"limit": 64},
               "steps": [{"distill": {"keep_layers": [0], "steps": 6, "batch_size": 4, "eval_every": 2,
                                      "checkpoint_every": 2, "eval_texts": 8, "max_length": 32}},
                         {"gguf": {"quant": "f16", "runtime": "transformers"}}],
               "evaluate": {"enabled": False}, "profile": None}
    (root / "decoder.yaml").write_text(yaml.safe_dump(decoder, sort_keys=False))
    early = {"name": "tinyee", "model": str(root / "bert"), "data": {"limit": 64},
             "steps": [{"early-exit": {"exits": [1], "steps": 4, "eval_every": 2, "checkpoint_every": 2,
                                       "validation": 16, "batch_size": 8, "budget": "cosine=0.5"}}],
             "evaluate": {"enabled": False}, "profile": None}
    (root / "early-exit.yaml").write_text(yaml.safe_dump(early, sort_keys=False))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("fault-logs"))


def _env(cache: Path, fault: str | None = None, fault_dir: Path | None = None, home: Path | None = None
         ) -> dict[str, str | None]:
    env = {"EDGESMITH_CACHE": str(cache), "EDGESMITH_FAULT": fault,
           "EDGESMITH_FAULT_DIR": str(fault_dir) if fault_dir else None}
    if home is not None:  # a user other than root cannot read root's home (nor its Hugging Face cache)
        env.update(HOME=str(home), HF_HOME=str(home / "hf"), XDG_CACHE_HOME=str(home / "xdg"))
    return env


def _run(runner: Runner, recipe: Path, runs: Path, cache: Path, cwd: Path, fault: str | None = None,
         **kwargs) -> Outcome:
    env = _env(cache, fault, kwargs.pop("fault_dir", None), home=cwd if kwargs.get("user") else None)
    return runner.run(["run", recipe, "--runs-dir", runs], env=env, cwd=cwd, **kwargs)


def _finished_run(runs: Path) -> Path:
    done = [d for d in runs.iterdir() if json.loads((d / "state.json").read_text())["status"] == "done"]
    assert len(done) == 1, [d.name for d in runs.iterdir()]
    return done[0]


#: what a pass records about one run of it, not about its output: wall times and speeds, the step a
#: training resumed from, and its timeline (this process's evaluations against its wall clock; the
#: history of every evaluation, which a resumed training reproduces exactly, is compared)
VOLATILE = ("seconds", "per_second", "resumed_from", "resumed_from_step", "timeline")


def _without_volatile(value):
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if not k.endswith(VOLATILE)}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def _outputs(run_dir: Path) -> dict[str, object]:
    """Every artifact file of a run folder: its SHA-256, or for ``edgesmith.json`` its content less
    the recorded wall times."""
    found: dict[str, object] = {}
    for f in sorted((run_dir / "artifacts").rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(run_dir))
            found[rel] = _without_volatile(json.loads(f.read_text())) if f.name == "edgesmith.json" else sha256_file(f)
    return found


def _debris(*folders: Path) -> list[str]:
    """Temp folders, lock files and unsealed cache entries anywhere under ``folders``."""
    left = []
    for folder in folders:
        if not folder.exists():
            continue
        for path in folder.rglob("*"):
            if path.name.startswith(TEMP_PREFIXES) or path.name.endswith((".lock", ".tmp")):
                left.append(str(path))
        steps = folder / "steps"
        if steps.is_dir():
            for entry in steps.iterdir():
                if entry.is_dir() and not entry.name.startswith(".") and not (steps / f"{entry.name}.seal.json").exists():
                    left.append(f"{entry} (unsealed)")
    return left


def _sealed_entries_verify(cache: Path) -> list[str]:
    """The keys of the sealed entries, each checked against its seal (a half-written entry never
    looks finished)."""
    steps = cache / "steps"
    keys = []
    for seal in sorted(steps.glob("*.seal.json")) if steps.is_dir() else []:
        key = seal.name.removesuffix(".seal.json")
        files = json.loads(seal.read_text())["files"]
        entry = steps / key
        present = sorted(str(f.relative_to(entry)) for f in entry.rglob("*") if f.is_file())
        assert present == sorted(files), f"{entry}: files differ from its seal"
        for rel, digest in files.items():
            assert sha256_file(entry / rel) == digest, f"{entry / rel}: differs from its seal"
        keys.append(key)
    return keys


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def encoder_reference(world, runner, tmp_path_factory):
    """The uninterrupted encoder run (prune → export → quantize): its run folder and cache."""
    root = tmp_path_factory.mktemp("encoder-reference")
    out = _run(runner, world / "encoder.yaml", root / "runs", root / "cache", root)
    assert out.code == 0, out.log
    run_dir = _finished_run(root / "runs")
    return {"run": run_dir, "cache": root / "cache", "outputs": _outputs(run_dir), "manifest": _manifest(run_dir)}


# ---------------------------------------------------------------------------------------------
# 1. kill -9 at every step boundary and inside the steps; the rerun finishes with the same bytes
# ---------------------------------------------------------------------------------------------

#: in order: each kill leaves the work the next run resumes from
ENCODER_KILLS = [
    "step:prune:start",      # the lock is held, nothing computed
    "step:prune:computed",   # the pass ran; nothing stored
    "write:entry#1",         # inside the store: the entry's temp folder exists, half filled
    "commit:entry#1",        # the entry is written in its temp folder, not renamed
    "seal:*#1",              # the entry is renamed into place but not sealed: unfinished to every reader
    "step:prune:stored",     # prune sealed (the next run reuses it)
    "scratch:export",        # inside the long export: its scratch folder made, the graph not yet written
    "step:export:computed",  # the graph made and validated, not stored
    "step:quantize:start",   # export stored; quantize holds its lock
    "step:quantize:computed",
    "commit:quantize",       # copying the last artifact into the run folder
    "run:evaluating",        # every artifact in the run folder, metrics not yet computed
    "run:done",              # manifest written, state not yet "done"
]


def test_kill_9_at_every_boundary_then_the_rerun_gives_the_same_bytes(world, runner, encoder_reference, tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    sealed_before: list[str] = []
    for fault in ENCODER_KILLS:
        out = _run(runner, world / "encoder.yaml", runs, cache, tmp_path, fault=f"kill@{fault}")
        assert out.code == -9, f"{fault}: the run was not killed there:\n{out.log[-3000:]}"
        sealed = _sealed_entries_verify(cache)
        assert set(sealed_before) <= set(sealed), f"{fault}: a finished entry was lost"
        sealed_before = sealed
    out = _run(runner, world / "encoder.yaml", runs, cache, tmp_path)
    assert out.code == 0, out.log
    final = _finished_run(runs)
    assert _outputs(final) == encoder_reference["outputs"]
    assert [s["cached"] for s in _manifest(final)["steps"]] == [True, True, True]
    assert [s["output_hash"] for s in _manifest(final)["steps"]] == \
        [s["output_hash"] for s in encoder_reference["manifest"]["steps"]]
    assert sorted(_sealed_entries_verify(cache)) == sorted(_sealed_entries_verify(encoder_reference["cache"]))
    assert _debris(cache, runs) == []
    states = {d.name: json.loads((d / "state.json").read_text())["status"] for d in runs.iterdir() if d != final}
    assert set(states.values()) == {"interrupted"}, states  # each killed run's folder says so


def test_kill_9_inside_distillation_checkpoints_and_gguf_writing(world, runner, tmp_path):
    """distill (checkpoints every 2 of 6 steps) → GGUF: killed mid-training, inside a checkpoint's
    write and inside the GGUF file's write; the reruns resume and end with the uninterrupted bytes."""
    reference = _run(runner, world / "decoder.yaml", tmp_path / "ref-runs", tmp_path / "ref-cache", tmp_path)
    assert reference.code == 0, reference.log
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    for fault in ("train:step:3",  # after the step-2 checkpoint: resumes at 2
                  "commit:last#1",  # inside the step-4 checkpoint's write: the step-2 one stays whole
                  "train:step:5",  # resumes at 4 this time
                  "commit:model.gguf"):  # distill stored; the GGUF file written beside its name, not renamed
        out = _run(runner, world / "decoder.yaml", runs, cache, tmp_path, fault=f"kill@{fault}")
        assert out.code == -9, f"{fault}:\n{out.log[-3000:]}"
        _sealed_entries_verify(cache)
    out = _run(runner, world / "decoder.yaml", runs, cache, tmp_path)
    assert out.code == 0, out.log
    final = _finished_run(runs)
    assert _outputs(final) == _outputs(_finished_run(tmp_path / "ref-runs"))
    assert [s["cached"] for s in _manifest(final)["steps"]] == [True, False]  # distill was stored before the kill
    assert _debris(cache, runs) == []
    assert not list((cache / "checkpoints").glob("*/*")), "the finished distillation left its checkpoints"


def test_kill_9_inside_early_exit_training_resumes_to_the_same_model(world, runner, tmp_path):
    reference = _run(runner, world / "early-exit.yaml", tmp_path / "ref-runs", tmp_path / "ref-cache", tmp_path)
    assert reference.code == 0, reference.log
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    out = _run(runner, world / "early-exit.yaml", runs, cache, tmp_path, fault="kill@train:step:3")
    assert out.code == -9, out.log[-3000:]
    out = _run(runner, world / "early-exit.yaml", runs, cache, tmp_path)
    assert out.code == 0, out.log
    assert _outputs(_finished_run(runs)) == _outputs(_finished_run(tmp_path / "ref-runs"))
    assert _debris(cache, runs) == []
    assert not list((cache / "checkpoints").glob("*/*")), "the finished early-exit training left its checkpoints"


def _sweep_front(folder: Path) -> list[tuple]:
    summary = json.loads((folder / "pareto.json").read_text())
    finished = [r for r in summary["trials"] if r.get("failure_kind") != "interrupted"]
    return sorted((json.dumps(r["params"], sort_keys=True), r["state"], round(r["measured"]["cosine"], 9),
                   r["measured"]["size"]) for r in finished)


def test_kill_9_inside_a_sweep_trial_then_resume_finds_the_same_trials(world, runner, encoder_reference, tmp_path):
    """A grid of two trials: killed inside a trial's quantize step (the per-channel one is cached
    already), then again right after a trial is recorded (before the front is written); each
    ``--resume`` reruns what was cut off."""
    pytest.importorskip("optuna", reason="sweeps need optuna (pip install 'edgesmith[sweep]')")
    doc = yaml.safe_load((world / "encoder.yaml").read_text())
    doc.update(name="tinysweep", search={"parameters": {"steps.quantize.per_channel": [True, False]},
                                         "objectives": {"cosine": "max", "size": "min"}, "budget": {"trials": 2},
                                         "sampler": {"name": "grid", "seed": 0}})
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    cache = tmp_path / "cache"
    for copy in (cache, tmp_path / "cache-2"):  # prune and export come from the cache: only the trials run
        shutil.copytree(encoder_reference["cache"], copy)
    reference = runner.run(["sweep", recipe, "--out", tmp_path / "reference", "--json"], env=_env(cache), cwd=tmp_path)
    assert reference.code == 0, reference.log
    folder = tmp_path / "killed"
    out = runner.run(["sweep", recipe, "--out", folder, "--json"],
                     env=_env(tmp_path / "cache-2", "kill@step:quantize:computed#1"), cwd=tmp_path)
    assert out.code == -9, out.log[-3000:]
    out = runner.run(["sweep", "--resume", folder, "--json"], env=_env(tmp_path / "cache-2", "kill@sweep:trial:*:told#1"),
                     cwd=tmp_path)
    assert out.code == -9, out.log[-3000:]
    out = runner.run(["sweep", "--resume", folder, "--json"], env=_env(tmp_path / "cache-2"), cwd=tmp_path)
    assert out.code == 0, out.log
    assert _sweep_front(folder) == _sweep_front(tmp_path / "reference")
    assert json.loads((folder / "pareto.json").read_text())["counts"]["running"] == 0
    assert _debris(tmp_path / "cache-2", folder) == []


def test_kill_9_of_a_profiling_worker_is_one_line_and_the_rerun_profiles(world, runner, tmp_path):
    """A generation profile measures in a worker process of its own; that worker killed mid-measure
    (the OOM killer, a user's kill -9) is one line, nothing written, and the same command then works."""
    profile = tmp_path / "out" / "profile.json"
    argv = ["profile", world / "llama", "--runtime", "torch", "--prompt-tokens", "8", "--new-tokens", "4",
            "--rounds", "2", "--warmup", "0", "-o", profile]
    killed = runner.run(argv, env=_env(tmp_path / "cache", "kill@profile-worker:round:0"), cwd=tmp_path)
    assert killed.code == 1, killed.log
    assert "the profiling worker for llama (torch) was killed by signal 9" in _error_line(killed)
    assert not profile.exists() and _debris(tmp_path / "out", tmp_path / "cache") == []
    again = runner.run(argv, env=_env(tmp_path / "cache"), cwd=tmp_path)
    assert again.code == 0, again.log
    assert json.loads(profile.read_text())["runtime"]["name"] == "torch"


# ---------------------------------------------------------------------------------------------
# 2. two processes on one cache
# ---------------------------------------------------------------------------------------------


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""  # a run just started may not have opened its log yet


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_processes_running_the_same_recipe_compute_each_step_once(world, runner, encoder_reference, tmp_path):
    """A holds the export step's lock (paused there); B, started then, waits for it and reuses it."""
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    gate.mkdir()
    first = runner.start(["run", world / "encoder.yaml", "--runs-dir", tmp_path / "runs-a"],
                         env=_env(cache, "pause@step:export:start", gate), cwd=tmp_path)
    _wait_for(lambda: any(gate.glob("*.paused")), "the first run to reach the export step")
    second = runner.start(["run", world / "encoder.yaml", "--runs-dir", tmp_path / "runs-b"], env=_env(cache),
                          cwd=tmp_path)
    _wait_for(lambda: "another edgesmith process is computing this step" in " ".join(_text(second[1]).split()),
              "the second run to wait for the export step")
    (gate / "release").touch()
    a, b = runner.wait(first), runner.wait(second)
    assert a.code == 0, a.log
    assert b.code == 0, b.log
    runs = [_finished_run(tmp_path / "runs-a"), _finished_run(tmp_path / "runs-b")]
    cached = [[s["cached"] for s in _manifest(r)["steps"]] for r in runs]
    assert cached[0][:2] == [False, False] and cached[1][:2] == [True, True], cached
    assert sorted([cached[0][2], cached[1][2]]) == [False, True], cached  # quantize: whoever came first
    assert _outputs(runs[0]) == _outputs(runs[1]) == encoder_reference["outputs"]
    assert len(_sealed_entries_verify(cache)) == 3
    assert _debris(cache, tmp_path / "runs-a", tmp_path / "runs-b") == []


def test_two_overlapping_recipes_at_once_share_their_common_steps(world, runner, tmp_path):
    cache = tmp_path / "cache"
    started = [runner.start(["run", world / name, "--runs-dir", tmp_path / f"runs-{i}"], env=_env(cache), cwd=tmp_path)
               for i, name in enumerate(("encoder.yaml", "encoder-other.yaml"))]
    outcomes = [runner.wait(s) for s in started]
    for out in outcomes:
        assert out.code == 0, out.log
    manifests = [_manifest(_finished_run(tmp_path / f"runs-{i}")) for i in range(2)]
    for index in (0, 1):  # prune and export: computed by one, reused by the other
        assert sorted(m["steps"][index]["cached"] for m in manifests) == [False, True], index
    assert [m["steps"][2]["cached"] for m in manifests] == [False, False]
    assert len(_sealed_entries_verify(cache)) == 4  # prune, export and two quantize entries
    assert _debris(cache, tmp_path / "runs-0", tmp_path / "runs-1") == []


def test_a_store_that_loses_the_race_keeps_the_first_entry(encoder_reference, tmp_path):
    """Where locks do not reach (NFS mounted with nolock), two writers of one step both store: the
    entry renamed first stays, the second is discarded, the seal matches what is there."""
    from edgesmith.artifacts import load
    from edgesmith.cache import StepCache

    key = encoder_reference["manifest"]["steps"][1]["cache_key"]
    cache = StepCache(tmp_path / "cache")
    cache.store(key, load(encoder_reference["cache"] / "steps" / key))
    first = cache.path(key).stat().st_ino
    cache.store(key, load(encoder_reference["cache"] / "steps" / key))
    assert cache.path(key).stat().st_ino == first
    assert cache.verify(key) is None and _debris(tmp_path / "cache") == []


# ---------------------------------------------------------------------------------------------
# 3. a tampered cache entry is detected on read and computed again, never used
# ---------------------------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_meta(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["task"] = "sequence-classification"
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("step, file, tamper", [
    (1, "model.onnx", _flip_a_byte),
    (0, "model.safetensors", _truncate),
    (2, "edgesmith.json", _edit_meta),
], ids=["onnx-byte-flipped", "safetensors-truncated", "edgesmith-json-edited"])
def test_a_tampered_cache_entry_is_computed_again_never_used(step, file, tamper, world, runner, encoder_reference,
                                                              tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(encoder_reference["cache"], cache)
    key = encoder_reference["manifest"]["steps"][step]["cache_key"]
    tamper(cache / "steps" / key / file)
    out = _run(runner, world / "encoder.yaml", tmp_path / "runs", cache, tmp_path)
    assert out.code == 0, out.log
    said = " ".join(out.log.split())  # the warning as one line, however the console wrapped it
    assert f"cache entry {key[:12]}" in said and f"{file} changed" in said, out.log
    final = _finished_run(tmp_path / "runs")
    cached = [s["cached"] for s in _manifest(final)["steps"]]
    assert cached == [i != step for i in range(3)]  # the later steps' keys are unchanged: reused
    assert _outputs(final) == encoder_reference["outputs"]
    assert key in _sealed_entries_verify(cache) and _debris(cache, tmp_path / "runs") == []


def test_damaged_cached_metrics_are_computed_again(world, runner, encoder_reference, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(encoder_reference["cache"], cache)
    damaged = sorted((cache / "metrics").glob("*.json"))
    assert damaged, "the reference run cached no metrics"
    for i, path in enumerate(damaged):
        path.write_text(['{"cosine": 0.99', '["not", "metrics"]', '{"cosine": "high"}'][i % 3])
    out = _run(runner, world / "encoder.yaml", tmp_path / "runs", cache, tmp_path)
    assert out.code == 0, out.log
    assert "are damaged; computing them again" in " ".join(out.log.split())
    metrics = _manifest(_finished_run(tmp_path / "runs"))["metrics"]
    reference = encoder_reference["manifest"]["metrics"]
    assert metrics.keys() == reference.keys()
    for art in reference:
        assert metrics[art] == pytest.approx(reference[art], abs=1e-6), art


def test_a_hard_linked_run_file_edited_in_place_does_not_poison_the_cache(world, runner, encoder_reference, tmp_path):
    """Run folders hard-link the cache's files: writing into one in place changes the cache entry too."""
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    shutil.copytree(encoder_reference["cache"], cache)
    assert _run(runner, world / "encoder.yaml", runs, cache, tmp_path).code == 0
    first = _finished_run(runs)
    with open(first / "artifacts" / "quantize" / "model.onnx", "r+b") as fh:  # in place: same inode
        fh.seek(100)
        fh.write(b"\0\0\0\0")
    (first / "state.json").write_text(json.dumps({"status": "interrupted"}))  # so the next run is the only "done"
    out = _run(runner, world / "encoder.yaml", runs, cache, tmp_path)
    assert out.code == 0, out.log
    assert "model.onnx changed" in " ".join(out.log.split())
    assert _outputs(_finished_run(runs)) == encoder_reference["outputs"]


# ---------------------------------------------------------------------------------------------
# 4. read-only, vanishing and full folders: one line, exit 2, nothing half-written elsewhere
# ---------------------------------------------------------------------------------------------


def _user() -> tuple[int, int]:
    """A user that is not root (``nobody``), or skip where the test does not run as root."""
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root; as a plain user these cases are the plain runs")
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _error_line(out: Outcome) -> str:
    errors = [line for line in out.lines if "error" in line]
    assert len(errors) == 1 and "Traceback" not in out.log, out.log
    return errors[0]


def _shared_folder(root: Path, name: str, mode: int) -> Path:
    folder = root / name
    folder.mkdir()
    os.chmod(folder, mode)
    return folder


@pytest.fixture()
def open_tmp(world):
    """A temp folder every user may enter (pytest's own is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="case-", dir=world))
    os.chmod(folder, 0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_read_only_runs_folder_is_one_line_exit_2(world, runner, open_tmp):
    user = _user()
    runs = _shared_folder(open_tmp, "runs", 0o555)
    cache = _shared_folder(open_tmp, "cache", 0o777)
    out = _run(runner, world / "encoder.yaml", runs, cache, open_tmp, user=user)
    assert out.code == 2, out.log
    assert _error_line(out).startswith(f"error: {runs}: permission denied"), out.log
    assert list(runs.iterdir()) == [] and _debris(cache) == [] and _sealed_entries_verify(cache) == []


def test_a_read_only_cache_is_one_line_exit_2(world, runner, open_tmp):
    user = _user()
    cache = _shared_folder(open_tmp, "cache", 0o555)
    out = _run(runner, world / "encoder.yaml", open_tmp / "runs", cache, open_tmp, user=user)
    assert out.code == 2, out.log
    assert _error_line(out).startswith(f"error: {cache}/steps: permission denied"), out.log
    assert list(cache.iterdir()) == []
    assert not (open_tmp / "runs").exists() or _debris(open_tmp / "runs") == []


def test_a_read_only_output_folder_of_a_one_pass_verb_is_one_line_exit_2(world, runner, open_tmp):
    user = _user()
    parent = _shared_folder(open_tmp, "out", 0o555)
    cache = _shared_folder(open_tmp, "cache", 0o777)
    out = runner.run(["export", world / "bert", "-o", parent / "model", "--json"], env=_env(cache, home=open_tmp),
                     cwd=open_tmp, user=user)
    assert out.code == 2, out.log
    assert _error_line(out).startswith(f"error: {parent}: permission denied"), out.log
    assert list(parent.iterdir()) == [] and _debris(cache) == []


def test_a_cache_written_by_one_user_is_reused_by_another(world, runner, encoder_reference, open_tmp):
    """A cache shared by a group: entries are made with the writer's umask (not mkdtemp's 0700), so
    another user reads and verifies them instead of computing them again or failing."""
    user = _user()
    cache = open_tmp / "cache"
    shutil.copytree(encoder_reference["cache"], cache)  # copy2 keeps the modes the writer's umask gave
    for folder in (cache, cache / "steps", cache / "metrics"):  # the shared folders (here: everyone's)
        os.chmod(folder, 0o777)
    runs = _shared_folder(open_tmp, "runs", 0o777)
    out = _run(runner, world / "encoder.yaml", runs, cache, open_tmp, user=user)
    assert out.code == 0, out.log
    final = _finished_run(runs)
    assert [s["cached"] for s in _manifest(final)["steps"]] == [True, True, True]
    assert _outputs(final) == encoder_reference["outputs"] and _debris(cache, runs) == []


def test_the_run_folder_deleted_mid_run_is_one_line_exit_2_and_the_rerun_resumes(world, runner, tmp_path):
    cache, runs, gate = tmp_path / "cache", tmp_path / "runs", tmp_path / "gate"
    gate.mkdir()
    started = runner.start(["run", world / "encoder.yaml", "--runs-dir", runs],
                           env=_env(cache, "pause@step:quantize:start", gate), cwd=tmp_path)
    _wait_for(lambda: any(gate.glob("*.paused")), "the run to reach the quantize step")
    (victim,) = list(runs.iterdir())
    shutil.rmtree(victim)
    (gate / "release").touch()
    out = runner.wait(started)
    assert out.code == 2, out.log
    assert f"{victim}: the run folder was deleted while the run was running" in _error_line(out)
    assert not victim.exists(), "the deleted run folder was made again"
    assert len(_sealed_entries_verify(cache)) == 3 and _debris(cache) == []  # quantize finished and stored
    rerun = _run(runner, world / "encoder.yaml", runs, cache, tmp_path)
    assert rerun.code == 0, rerun.log
    assert [s["cached"] for s in _manifest(_finished_run(runs))["steps"]] == [True, True, True]


@pytest.fixture()
def full_disk(tmp_path):
    """A 1 MiB tmpfs: a real file system that fills up (needs root with CAP_SYS_ADMIN)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root with "
                    "CAP_SYS_ADMIN")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_cache_on_a_full_disk_is_one_line_exit_2(world, runner, full_disk, tmp_path):
    cache = full_disk / "cache"
    out = _run(runner, world / "encoder.yaml", tmp_path / "runs", cache, tmp_path)
    assert out.code == 2, out.log
    line = _error_line(out)
    assert "no space left on device" in line and str(cache) in line, line
    assert _debris(cache) == [] and _sealed_entries_verify(cache) == []
    assert [p.name for p in (cache / "steps").iterdir()] == []
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert json.loads((run_dir / "state.json").read_text())["status"] == "failed"
    assert not (run_dir / "artifacts").exists()


# ---------------------------------------------------------------------------------------------
# 5. TensorRT's engine cache: a damaged engine.json is rebuilt, never used (a strict fake TensorRT:
#    the builder code runs for real on a machine without a GPU)
# ---------------------------------------------------------------------------------------------


def _symlink_loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name(path.name + ".link"))
    path.with_name(path.name + ".link").symlink_to(path)


def _json_change(change):
    def edit(path: Path) -> None:
        value = json.loads(path.read_text())
        change(value)
        path.write_text(json.dumps(value))
    return edit


ENGINE_BREAKAGES = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]),
    "random": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "directory": lambda p: (p.unlink(), p.mkdir()),
    "symlink-loop": _symlink_loop,
    "wrong-types": _json_change(lambda m: m.update(profiles="all", precision=["fp16"])),
    "missing-keys": _json_change(lambda m: m.pop("gpu_name")),
    "engine-file-missing": lambda p: p.with_name("model.engine").unlink(),
}


@pytest.mark.parametrize("breakage", ENGINE_BREAKAGES)
def test_a_damaged_cached_tensorrt_engine_is_built_again(breakage, encoder_reference, tmp_path, monkeypatch, caplog):
    from fake_tensorrt import FakeTensorRT

    import edgesmith.tensorrt.build as trt_build
    from edgesmith.artifacts import load
    from edgesmith.tensorrt import backends as trt_backends
    from edgesmith.tensorrt.build import TensorRTConfig, build_engine, engine_artifact
    from edgesmith.tensorrt.identity import DeviceIdentity

    version = "10.16.1.11"
    fake = FakeTensorRT(version, {"OnnxParser.parse_from_file": lambda parser, path: True,
                                  "IHostMemory.__bytes__": b"engine-bytes"})
    monkeypatch.setattr(trt_backends, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_build, "device_identity", lambda: DeviceIdentity(version, "NVIDIA H200", "9.0"))
    model = load(encoder_reference["cache"] / "steps" / encoder_reference["manifest"]["steps"][1]["cache_key"])
    cfg = TensorRTConfig(precision="fp16", shapes=["batch=1:2:4,seq=8:16:32"], backend="python")
    folder = build_engine(model, cfg, cache_root=tmp_path / "cache")
    record = json.loads((folder / "engine.json").read_text())
    ENGINE_BREAKAGES[breakage](folder / "engine.json")

    again = build_engine(model, cfg, cache_root=tmp_path / "cache")

    assert again == folder
    assert "is damaged" in caplog.text and "building it again" in caplog.text
    rebuilt = json.loads((folder / "engine.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "built"} == {k: v for k, v in record.items() if k != "built"}
    assert (folder / "model.engine").read_bytes() == b"engine-bytes"
    assert sorted(p.name for p in folder.iterdir()) == ["engine.json", "model.engine"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(TEMP_PREFIXES)]
    out = tmp_path / "engine"
    out.mkdir()
    assert engine_artifact(model, again, out).meta["tensorrt"]["gpu_name"] == "NVIDIA H200"
