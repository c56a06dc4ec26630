"""``softmax_floor: auto``: the quantize pass floors the attention Softmax only where it measured the
floor faster on this machine, and records the decision with the machine and both timings.

No timing is asserted: whatever this machine measures, the graph carries the floor exactly when the
record says it was kept, and the record holds what the decision was made from."""

from __future__ import annotations

import json

import onnx
import pytest
from test_quantize import quantize, tiny_onnx, tokenizer  # noqa: F401  (fixtures)

from edgesmith.compress.quantization import QuantizeConfig, QuantizePass
from edgesmith.compress.quantization import softmax_choice as choice_module
from edgesmith.compress.quantization.softmax_choice import SHAPES, keep_floor
from edgesmith.errors import BadInput
from edgesmith.onnx_graph.softmax import softmax_floor_of


def test_the_rule_keeps_the_floor_only_when_faster_somewhere_and_slower_nowhere():
    assert keep_floor(["faster", "within noise", "within noise"])
    assert keep_floor(["faster", "faster", "faster"])
    assert not keep_floor(["faster", "slower", "faster"])
    assert not keep_floor(["within noise", "within noise", "within noise"])
    assert not keep_floor(["slower", "slower", "slower"])


def _check_record(choice: dict) -> None:
    assert choice["setting"] == "auto" and choice["candidate"] == -80.0 and choice["softmax_nodes"] == 2
    assert choice["machine"]["cpu_model"] and choice["machine"]["isa"] and isinstance(choice["machine"]["isa_flags"], list)
    assert choice["machine"]["cpu_model"] in choice["decision"] and choice["runtime"].startswith("onnxruntime ")
    assert [s["shape"] for s in choice["shapes"]] == [label for label, _, _ in SHAPES]
    for shape, (_, batch, seq) in zip(choice["shapes"], SHAPES):
        assert shape["batch"] == batch and shape["without_floor_ms"] > 0 and shape["with_floor_ms"] > 0
        low, high = shape["speedup_ci"]
        assert low <= shape["speedup"] <= high and shape["verdict"] in ("faster", "slower", "within noise")
        if seq is None:  # padded to the longest row: each input batch at its own length
            assert all(0 < t < 128 for t in shape["tokens"])
        else:
            assert shape["tokens"] == seq


def test_auto_decides_by_measurement_and_the_graph_follows(tiny_onnx):  # noqa: F811
    out, report = quantize(tiny_onnx, softmax_floor="auto")
    choice = report["softmax_floor_choice"]
    _check_record(choice)
    kept = keep_floor([s["verdict"] for s in choice["shapes"]])
    assert (choice["floor"] == -80.0) == kept and (choice["floor"] is None) == (not kept)
    carried = softmax_floor_of(onnx.load(str(out.path)))
    assert carried == ({"floor": -80.0, "floored": 2} if kept else None)
    assert out.meta["quantization"].get("softmax_floor") == choice["floor"]
    assert out.meta["quantization"]["softmax_floor_choice"] == choice


@pytest.mark.parametrize("faster", [True, False])
def test_the_graph_carries_the_floor_iff_the_rule_keeps_it(tiny_onnx, monkeypatch, faster):  # noqa: F811
    monkeypatch.setattr(choice_module, "keep_floor", lambda verdicts: faster)
    out, report = quantize(tiny_onnx, softmax_floor="auto")
    choice = report["softmax_floor_choice"]
    _check_record(choice)
    assert choice["floor"] == (-80.0 if faster else None)
    assert choice["decision"].startswith("floor -80 kept" if faster else "no floor")
    assert softmax_floor_of(onnx.load(str(out.path))) == ({"floor": -80.0, "floored": 2} if faster else None)
    assert ("softmax_floor" in report) == faster  # the rewrite's own record, as with a numeric floor


def test_a_numeric_floor_still_floors_without_measuring(tiny_onnx, monkeypatch):  # noqa: F811
    monkeypatch.setattr(choice_module, "time_both", lambda *a, **k: pytest.fail("a numeric floor is not measured"))
    out, report = quantize(tiny_onnx, softmax_floor=-70.0)
    assert "softmax_floor_choice" not in report and "softmax_floor_choice" not in out.meta["quantization"]
    assert softmax_floor_of(onnx.load(str(out.path))) == {"floor": -70.0, "floored": 2}


def test_auto_options_and_the_cache_key():
    with pytest.raises(BadInput, match="GPU targets"):
        QuantizePass(mode="fp16", softmax_floor="auto")
    with pytest.raises(BadInput, match="softmax_floor"):
        QuantizePass(softmax_floor="fast")
    assert QuantizeConfig(softmax_floor="-80").softmax_floor == -80.0  # the CLI passes its value as text
    # the choice is measured on this CPU: a step cached on another CPU must not be reused
    from edgesmith.profiling.agent import cpu_model

    assert QuantizeConfig(softmax_floor="auto").key_dump()["softmax_floor_cpu"]["cpu_model"] == cpu_model()
    assert "softmax_floor_cpu" not in QuantizeConfig(softmax_floor=-80.0).key_dump()
    assert "softmax_floor" not in QuantizeConfig().key_dump()  # older configs keep their cache keys


def test_cli_softmax_floor_auto_and_bad_values(capsys, tiny_onnx, tmp_path, cache_dir):  # noqa: F811
    from edgesmith.cli.app import main

    def cli(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    runs, model = str(tmp_path / "runs"), str(tiny_onnx.path)
    code, out, err = cli("quantize", model, "--softmax-floor", "auto", "--runs-dir", runs, "--json")
    assert code == 0, err
    choice = json.loads(out)["report"]["softmax_floor_choice"]
    assert choice["setting"] == "auto" and len(choice["shapes"]) == len(SHAPES)
    code, _, err = cli("quantize", model, "--softmax-floor", "fast", "--runs-dir", runs)
    assert code == 2 and "softmax_floor" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("quantize", model, "--softmax-floor", "-80", "--runs-dir", runs, "--json")
    assert code == 0, err
    assert json.loads(out)["report"]["softmax_floor"] == {"rewritten": 2, "floor": -80.0}
