"""The defects of issue 18: a corrupt safetensors file, a model folder without a tokenizer, a full
disk during export, and one-pass verbs that wrote run folders into the working folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from edgesmith.cli.app import main
from edgesmith.errors import NoSpace, no_space, no_space_cause
from edgesmith.storage import atomic_dir, write_json_atomic

NO_SPACE_HINT = "free space or point EDGESMITH_CACHE / -o elsewhere"


def _cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture()
def cwd(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# 1. a corrupt model.safetensors is the user's file, not edgesmith's fault
# ---------------------------------------------------------------------------------------------


def test_a_corrupt_safetensors_is_exit_2_naming_the_file(capsys, tiny_bert_dir, tmp_path, cache_dir, cwd):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the header length now points past the end
    for argv in (["inspect", folder], ["export", folder, "-o", cwd / "out"]):
        code, _, err = _cli(capsys, *argv)
        assert code == 2, err
        assert err.strip().splitlines()[-1] == (f"error: {weights}: not a valid safetensors file (Error while deserializing header: "
                               "invalid header length); re-save the model")
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 2. a folder without a tokenizer exports (probe inputs from the config); 4. nothing in the cwd
# ---------------------------------------------------------------------------------------------


def _bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).eval().save_pretrained(folder)


def _gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                         eos_token_id=0)).eval().save_pretrained(folder)


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_a_folder_without_tokenizer_exports_validated_leaving_only_the_output(make, capsys, tmp_path, cache_dir,
                                                                              cwd):
    torch.manual_seed(0)
    model = tmp_path / "checkpoint"
    make(model)
    assert not any(model.glob("*token*")) and not (model / "vocab.txt").exists()

    code, out, err = _cli(capsys, "export", model, "-o", "out", "--json")
    assert code == 0, err
    summary = json.loads(out)
    report = summary["report"]
    assert report["max_abs"] < 1e-3 and report["min_cosine"] > 0.9999
    assert len(report["probes"]) == 4 and any(p["padded_positions"] for p in report["probes"])
    assert "no tokenizer" in summary["evaluation"]
    assert sorted(p.name for p in cwd.iterdir()) == ["out"]  # no runs/ folder beside it
    assert (cwd / "out" / "model.onnx").exists()
    record = Path(summary["run_dir"])
    assert record.parent == cache_dir / "one-pass" and (record / "manifest.json").exists()


def test_id_probes_follow_the_config_limits():
    from edgesmith.validation import id_probe_feeds

    probes = id_probe_feeds({"vocab_size": 50, "max_positions": 20, "pad_token_id": 1},
                            ["input_ids", "attention_mask", "token_type_ids"], batches=(1, 3), seq_lengths=(48,),
                            left_padding=True)
    assert len(probes) == 8  # 2 batch sizes x (longest, 48) x 2 padding sides
    for desc, feeds in probes:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.shape[1] <= 18 and ids.max() < 50 and feeds["token_type_ids"].sum() == 0
        assert (ids[mask == 0] == 1).all() and mask.sum(axis=1).max() == ids.shape[1]
        side = mask[:, -1] if desc["padding"] == "left" else mask[:, 0]
        assert side.all()


def test_a_failed_one_pass_call_leaves_the_working_folder_empty(capsys, tmp_path, cache_dir, cwd):
    model = tmp_path / "checkpoint"
    _bert(model)
    (model / "config.json").write_text("{")
    code, _, err = _cli(capsys, "export", model, "-o", "out")
    assert code == 2 and "config.json" in err
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("verb", ["export", "quantize", "prune", "distill", "early-exit"])
def test_each_one_pass_verb_says_where_its_run_record_goes(verb, capsys):
    code, out, _ = _cli(capsys, verb, "--help")
    assert code == 0
    assert "one-pass" in out and "--runs-dir" in out


# ---------------------------------------------------------------------------------------------
# 3. a full disk is said as such, whichever writer meets it
# ---------------------------------------------------------------------------------------------


def _full(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) or None)


def test_no_space_is_found_behind_wrappers_and_copy_errors(tmp_path):
    wrapped = RuntimeError("exporter failed")
    wrapped.__cause__ = _full("x")
    assert no_space_cause(wrapped).errno == errno.ENOSPC
    copy_error = shutil.Error([("a", str(tmp_path / "b"), "[Errno 28] No space left on device: 'b'")])
    assert no_space_cause(copy_error).filename == str(tmp_path / "b")
    assert no_space_cause(OSError(errno.EACCES, "denied")) is None
    quota = no_space(tmp_path, OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert str(quota).startswith(f"quota exceeded writing {tmp_path}")
    assert str(no_space(tmp_path / "f")) == f"no space left on device writing {tmp_path / 'f'}; {NO_SPACE_HINT}"


def test_the_atomic_writers_say_no_space(tmp_path, monkeypatch):
    def full_fsync(fd):
        raise _full()

    monkeypatch.setattr(os, "fsync", full_fsync)
    with pytest.raises(NoSpace, match=f"writing {tmp_path / 'p.json'}; "):
        write_json_atomic(tmp_path / "p.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []  # no temp file left
    with pytest.raises(NoSpace, match=f"writing {tmp_path / 'entry'}; "):
        with atomic_dir(tmp_path / "entry"):
            raise _full(tmp_path / "entry" / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_export_is_not_an_exporter_hint(capsys, monkeypatch, tiny_bert_dir, cache_dir, cwd):
    def full_export(*args, **kwargs):
        try:
            raise _full(args[2])
        except OSError as exc:  # the exporter wraps what it meets
            raise RuntimeError("Failed to save the ONNX model") from exc

    monkeypatch.setattr(torch.onnx, "export", full_export)
    code, _, err = _cli(capsys, "export", tiny_bert_dir, "-o", "out")
    assert code == 2, err
    assert "no space left on device writing " in err and "model.onnx" in err and NO_SPACE_HINT in err
    assert "attention" not in err and "opset" not in err
    assert list(cwd.iterdir()) == []
    assert not [p for p in (cache_dir / "steps").iterdir()]  # no entry, no scratch folder


@pytest.fixture(scope="module")
def onnx_folder(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT exported once (its own cache), for the quantize and profile cases."""
    root = tmp_path_factory.mktemp("one-pass-onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGESMITH_CACHE", str(root / "cache"))
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(tiny_bert_dir), "-o", str(root / "onnx"), "--json"])
    assert exit_info.value.code == 0
    return root / "onnx"


def test_a_full_disk_in_the_step_cache_and_profile_writing(capsys, monkeypatch, onnx_folder, cache_dir, cwd):
    from edgesmith.artifacts import FolderArtifact

    onnx = onnx_folder

    def full_write(self, folder):
        raise _full(folder / "model.onnx")

    with monkeypatch.context() as patch:
        patch.setattr(FolderArtifact, "_write", full_write)
        code, _, err = _cli(capsys, "quantize", onnx, "-o", "int8")
    assert code == 2, err
    assert f"no space left on device writing {cache_dir / 'steps'}" in err and NO_SPACE_HINT in err
    assert not [p for p in (cache_dir / "steps").iterdir() if p.name.startswith(".tmp-")]

    def full_fsync(fd):
        raise _full()

    with monkeypatch.context() as patch:  # the profile is measured, then its atomic write meets a full disk
        patch.setattr(os, "fsync", full_fsync)
        code, _, err = _cli(capsys, "profile", onnx, "--batch", "1", "--seq", "8", "--iterations", "2", "--warmup",
                            "0", "-o", "p.json")
    assert code == 2, err
    assert f"no space left on device writing p.json; {NO_SPACE_HINT}" in err
    assert not (cwd / "p.json").exists()


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``folder``; the reason when that is not possible here."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    folder.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip() or done.returncode}"


@pytest.mark.parametrize("verb", ["export", "quantize"])
def test_a_real_full_disk(verb, capsys, monkeypatch, tiny_bert_dir, onnx_folder, tmp_path, cwd):
    """A 1 MiB tmpfs as the cache: the tiny BERT's graph (4 MB of embeddings) does not fit, nor its
    INT8 copy (1.2 MB)."""
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "1m")
    if reason:
        pytest.skip(reason)
    try:
        monkeypatch.setenv("EDGESMITH_CACHE", str(disk / "cache"))
        model = tiny_bert_dir if verb == "export" else onnx_folder
        code, _, err = _cli(capsys, verb, model, "-o", "out", "--json")
        assert code == 2, err
        assert err.startswith("error: no space left on device writing ") and NO_SPACE_HINT in err, err
        assert len(err.strip().splitlines()) == 1
        assert list(cwd.iterdir()) == []
        steps = disk / "cache" / "steps"
        assert not [p for p in steps.iterdir()]  # no entry and no scratch folder left on the full disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)
        if os.path.ismount(disk):
            subprocess.run(["umount", "-l", str(disk)], check=False)
