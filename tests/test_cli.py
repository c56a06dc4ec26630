"""The command line: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json

import pytest

from edgesmith.cli.app import main


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_bad_recipe_is_one_line_and_exit_2(capsys, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model: minilm\nstepz: []\n")
    code, out, err = _cli(capsys, "run", str(recipe))
    assert code == 2
    assert "unknown key 'stepz'" in err and "allowed keys:" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_recipe_and_missing_model(capsys, tmp_path):
    code, _, err = _cli(capsys, "run", str(tmp_path / "none.yaml"))
    assert code == 2 and "not found" in err
    code, _, err = _cli(capsys, "inspect", str(tmp_path / "no-model"))
    assert code == 2 and "not found" in err


def test_corrupt_onnx_file_is_bad_input(capsys, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf")
    code, _, err = _cli(capsys, "inspect", str(bad))
    assert code == 2
    assert "not a valid ONNX model" in err


def test_usage_error_is_exit_2(capsys):
    code, _, _ = _cli(capsys, "prune", "--heads")
    assert code == 2


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = _cli(capsys, "--debug", "run", str(tmp_path / "none.yaml"))
    assert code == 2 and "Traceback" in err


def test_doctor_json_lists_runtimes(capsys):
    code, out, _ = _cli(capsys, "doctor", "--json")
    assert code == 0
    rows = {r["runtime"]: r for r in json.loads(out)}
    assert rows["torch"]["usable"] and rows["onnxruntime"]["usable"]
    assert not rows["torch-cuda"]["usable"] or rows["torch-cuda"]["devices"]
    assert rows["tensorrt"]["reason"] or rows["tensorrt"]["usable"]


def test_inspect_json_of_a_tiny_model(capsys, tiny_bert_dir):
    code, out, _ = _cli(capsys, "inspect", str(tiny_bert_dir), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["kind"] == "torch" and info["architecture"] == "BertModel"
    assert [a["heads"] for a in info["attention"]] == [4, 4]
    assert [f["ffn"] for f in info["ffn"]] == [64, 64]
    assert info["format"].startswith("Hugging Face")


def test_prune_export_quantize_profile_compare_from_the_cli(capsys, tiny_bert_dir, tmp_path, cache_dir):
    runs = str(tmp_path / "runs")
    pruned, onnx_dir, int8 = tmp_path / "pruned", tmp_path / "onnx", tmp_path / "int8"
    code, out, err = _cli(capsys, "prune", str(tiny_bert_dir), "--heads", "0.5", "--ffn", "0.5", "-o", str(pruned),
                          "--runs-dir", runs, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["metrics"]["cosine"] < 1.0
    code, out, _ = _cli(capsys, "inspect", str(pruned), "--json")
    info = json.loads(out)
    assert [a["heads"] for a in info["attention"]] == [2, 2]
    assert info["format"].startswith("edgesmith structure")

    code, out, err = _cli(capsys, "export", str(pruned), "--to", "onnx", "-o", str(onnx_dir), "--runs-dir", runs)
    assert code == 0, err
    assert (onnx_dir / "model.onnx").exists()
    code, out, err = _cli(capsys, "quantize", str(onnx_dir), "-o", str(int8), "--runs-dir", runs, "--json")
    assert code == 0, err
    assert json.loads(out)["report"]["size_after"] < json.loads(out)["report"]["size_before"]
    floored = tmp_path / "int8-floor"
    code, out, err = _cli(capsys, "quantize", str(onnx_dir), "--softmax-floor", "-80", "--drop-node-metadata",
                          "-o", str(floored), "--runs-dir", runs, "--json")
    assert code == 0, err
    import onnx

    graph = onnx.load(str(floored / "model.onnx")).graph
    makers = {o: n.op_type for n in graph.node for o in n.output}
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert softmaxes and all(makers.get(n.input[0]) == "Max" for n in softmaxes)
    assert not any(n.metadata_props for n in graph.node)
    assert any(n.metadata_props for n in onnx.load(str(int8 / "model.onnx")).graph.node)  # kept by default
    code, _, err = _cli(capsys, "quantize", str(onnx_dir), "--softmax-floor", "-100", "-o", str(tmp_path / "bad"))
    assert code == 2 and "softmax_floor" in err

    p1, p2 = tmp_path / "fp32.json", tmp_path / "int8.json"
    for model, path in ((onnx_dir, p1), (int8, p2)):
        code, _, err = _cli(capsys, "profile", str(model), "--runtime", "onnxruntime", "--batch", "2", "--seq", "16",
                            "--iterations", "8", "--warmup", "1", "--output", str(path))
        assert code == 0, err
        assert json.loads(path.read_text())["runtime"]["providers"] == ["CPUExecutionProvider"]
    code, out, _ = _cli(capsys, "compare", str(p1), str(p2), "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert rows[0]["verdict"] == "baseline" and rows[1]["verdict"] in ("faster", "slower", "within noise")


def test_export_of_onnx_is_refused_with_exit_2(capsys, tmp_path, tiny_bert_dir):
    code, _, err = _cli(capsys, "export", str(tiny_bert_dir), "--to", "tflite")
    assert code == 2 and "only 'onnx'" in err
