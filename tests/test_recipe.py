"""Recipes are validated before anything runs: unknown keys, bad values, chains that do not fit."""

from __future__ import annotations

import pytest

from edgesmith.errors import BadInput
from edgesmith.pipeline import plan
from edgesmith.recipe import Recipe


def test_steps_parse_to_ids_and_options():
    recipe = Recipe.from_dict({"steps": [{"prune": {"heads": 0.25}}, "export", {"quantize": {}},
                                         {"quantize": {"per_channel": False}}]})
    assert [s.id for s in recipe.steps] == ["prune", "export", "quantize", "quantize-2"]
    assert recipe.steps[0].options == {"heads": 0.25}
    assert recipe.artifact_ids() == ["source", "prune", "export", "quantize", "quantize-2"]
    # without an explicit list, every artifact is profiled
    assert [t.artifact for t in recipe.profile_targets()] == recipe.artifact_ids()


@pytest.mark.parametrize(("data", "expected"), [
    ({"modle": "minilm"}, "unknown key 'modle'; allowed keys: data, evaluate, gates, model, name, profile, steps, task"),
    ({"data": {"pth": "x"}}, "unknown key 'data.pth'; allowed keys: label_field, limit, offset, path, text_field"),
    ({"profile": {"batch": 0}}, "'profile.batch': Input should be greater than 0"),
    ({"profile": {"artifacts": ["nope"]}}, "profile.artifacts names 'nope', which is not a step"),
    ({"steps": [{"prune": {}, "export": {}}]}, "step 1 must be one mapping"),
    ({"gates": {"cosine": -0.1}}, "cannot be negative"),
])
def test_bad_recipes_name_the_key(data, expected):
    with pytest.raises(BadInput) as err:
        Recipe.from_dict(data)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsteps:\n  - prune: {heads: 0.5\n")
    with pytest.raises(BadInput, match=r"bad.yaml:\d+: not valid YAML"):
        Recipe.load(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(BadInput, match="empty recipe"):
        Recipe.load(empty)
    with pytest.raises(BadInput, match="not found"):
        Recipe.load(tmp_path / "missing.yaml")


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my-recipe.yaml"
    path.write_text("model: minilm\nsteps: [export]\n")
    assert Recipe.load(path).name == "my-recipe"


def test_chain_that_does_not_fit_is_refused_before_work(tiny_bert_dir):
    recipe = Recipe.from_dict({"model": str(tiny_bert_dir), "steps": [{"quantize": {}}]})
    with pytest.raises(BadInput, match=r"step 1 \(quantize\): pass 'quantize' takes onnx models, but the model gives a torch model; add an export step"):
        plan(recipe)
    recipe = Recipe.from_dict({"model": str(tiny_bert_dir), "steps": ["export", {"prune": {"heads": 0.5}}]})
    with pytest.raises(BadInput, match=r"step 2 \(prune\).*takes torch models, but step 1 \(export\) gives a onnx model"):
        plan(recipe)


def test_unknown_pass_and_bad_pass_options(tiny_bert_dir):
    with pytest.raises(BadInput, match="unknown pass 'prnue'; available passes: .*prune"):
        plan(Recipe.from_dict({"model": str(tiny_bert_dir), "steps": [{"prnue": {}}]}))
    with pytest.raises(BadInput, match=r"step 1 \(prune\): unknown key 'hedas'"):
        plan(Recipe.from_dict({"model": str(tiny_bert_dir), "steps": [{"prune": {"hedas": 0.5}}]}))


def test_unknown_gate_metric_and_runtime_mismatch(tiny_bert_dir):
    with pytest.raises(BadInput, match="gates: unknown metric 'cosinus'"):
        plan(Recipe.from_dict({"model": str(tiny_bert_dir), "steps": ["export"], "gates": {"cosinus": 0.1}}))
    with pytest.raises(BadInput, match="runtime 'onnxruntime' cannot run 'source'"):
        plan(Recipe.from_dict({"model": str(tiny_bert_dir), "steps": ["export"],
                               "profile": {"artifacts": [{"artifact": "source", "runtime": "onnxruntime"}]}}))


def test_missing_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        plan(Recipe.from_dict({"model": str(tmp_path / "nope"), "steps": ["export"]}))
