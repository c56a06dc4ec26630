"""The Python API: the same passes, export, evaluation, profiling and comparison a recipe uses."""

from __future__ import annotations

import json

import pytest

import edgesmith as es


def test_script_path_prune_export_quantize_profile_compare(tiny_bert_dir, tmp_path):
    m = es.load(str(tiny_bert_dir))
    assert isinstance(m, es.TorchModel)
    before = m.content_hash()
    p = es.compress.prune(m, heads=0.5, ffn=0.5)
    assert m.content_hash() == before  # passes never mutate their input
    o = es.export.to_onnx(p)
    q = es.compress.quantize(o, min_cosine=0.5)
    assert isinstance(o, es.OnnxModel) and isinstance(q, es.OnnxModel)
    assert [step["pass"] for step in q.lineage] == ["prune", "export", "quantize"]
    assert q.lineage[0]["input_hash"] == before
    assert q.lineage[-1]["output_hash"] == q.content_hash()

    texts = ["a small dog ran across the road", "the committee approved the budget", "she sang all night",
             "prices rose sharply in the spring", "he fixed the old bicycle", "rain fell on the quiet town"] * 3
    metrics = es.evaluate(q, m, texts, k=3)
    assert 0.0 < metrics["cosine"] < 1.0 and 0.0 <= metrics["recall@3"] <= 1.0

    base = es.profile(m, runtime="torch", batch=2, seq=16, warmup=1, iterations=5)
    fast = es.profile(q, runtime="onnxruntime", batch=2, seq=16, warmup=1, iterations=5)
    assert base.runtime.providers == ["torch-cpu"] and fast.runtime.providers == ["CPUExecutionProvider"]
    comparison = es.compare([base, fast])
    assert comparison.rows[0].verdict == "baseline"
    assert "| " in comparison.markdown()

    saved = q.save(tmp_path / "int8")
    again = es.load(saved)
    assert again.content_hash() == q.content_hash()
    assert json.loads((saved / "edgesmith.json").read_text())["lineage"][-1]["pass"] == "quantize"


def test_recipe_objects_run_from_python(tiny_bert_dir, tmp_path, cache_dir):
    recipe = es.Recipe.from_dict({"name": "api", "model": str(tiny_bert_dir), "data": {"limit": 24},
                                  "steps": [{"export": {}}], "profile": None})
    result = es.run(recipe, runs_dir=tmp_path / "runs", progress=False)
    assert result.deployable
    assert result.metrics["export"]["cosine"] > 0.9999
    assert (result.run_dir / "artifacts" / "export" / "model.onnx").exists()


def test_passes_are_registered_with_their_contract():
    passes = es.compress.available_passes()
    assert {"prune", "export", "quantize"} <= set(passes)
    assert passes["prune"].accepts == (es.TorchModel,) and passes["prune"].returns is es.TorchModel
    assert passes["quantize"].accepts == (es.OnnxModel,)
    with pytest.raises(es.BadInput, match="unknown pass 'sparsify'"):
        es.compress.get_pass("sparsify")


def test_a_third_party_pass_registers_and_runs(tiny_bert_dir):
    """A plug-in pass (what the edgesmith.passes entry-point group loads) plugs into the same contract."""
    import torch

    from edgesmith.passes import Pass, PassConfig, register

    class ScaleConfig(PassConfig):
        factor: float = 2.0

    @register
    class ScaleEmbeddings(Pass):
        name = "test-scale-embeddings"
        config_class = ScaleConfig
        accepts = (es.TorchModel,)
        returns = es.TorchModel

        def apply(self, artifact, ctx):
            import copy

            module = copy.deepcopy(artifact.module)
            with torch.no_grad():
                module.embeddings.word_embeddings.weight.mul_(self.config.factor)
            ctx.report["factor"] = self.config.factor
            return artifact.derive(module=module)

    m = es.load(str(tiny_bert_dir))
    out = es.compress.get_pass("test-scale-embeddings")(factor=3.0)(m)
    assert out.lineage[-1]["report"] == {"factor": 3.0}
    assert out.content_hash() != m.content_hash()
    with pytest.raises(es.BadInput, match="unknown key 'factr'"):
        es.compress.get_pass("test-scale-embeddings")(factr=3.0)


@pytest.mark.slow
def test_packaged_minilm_end_to_end_through_the_api():
    m = es.load("minilm")
    assert m.parameter_count() == 22_713_216
    q = es.compress.quantize(es.export.to_onnx(m), quantize_embeddings=True)
    from edgesmith.data import builtin_corpus

    metrics = es.evaluate(q, m, builtin_corpus(limit=128))
    assert metrics["cosine"] > 0.98
    assert q.size_bytes() < 30e6
