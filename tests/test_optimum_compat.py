"""The plain ONNX decoder export where Optimum's users run it (issue 24): ``logits_to_keep`` is an
optional input with the keep-everything default, the tokenizer config names a class transformers 4
has, and Optimum's ``ORTModelForCausalLM`` (optimum-onnx on transformers 4.57, in
bench/.venv-optimum, driven as a subprocess) generates edgesmith's greedy tokens.

The unit tests run on a tiny random Llama (GQA) with the byte-level BPE of test_decoder_export;
the ``optimum``-marked ones need bench/.venv-optimum (``python bench/optimum_env.py``) and skip
with that reason where it is not built (CI's ``make test`` does not build it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_decoder_export import PROMPTS, tiny, tokenizer  # noqa: F401 (tokenizer: a fixture)

from edgesmith.artifacts import ONNX_FILE, TorchModel
from edgesmith.export.decoder import export_decoder
from edgesmith.export.decoder_genai import add_logits_to_keep
from edgesmith.export.tokenizer_class import portable_tokenizer_class
from edgesmith.onnx_graph.edit import set_input_default
from edgesmith.runtimes.generation import GenerationConfig, generate, generate_batch, open_decoder, prompt_ids

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16

#: run by bench/.venv-optimum's python: what a user of Optimum writes, on the exported folder
OPTIMUM_SCRIPT = r"""
import json, sys
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

spec = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(spec["folder"])
model = ORTModelForCausalLM.from_pretrained(spec["folder"])
out = {"tokenizer": type(tok).__name__, "prompt_ids": [], "tokens": []}
for prompt in spec["prompts"]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=spec["new_tokens"])
    out["prompt_ids"].append(ids[0].tolist())
    out["tokens"].append(gen[0, ids.shape[1]:].tolist())
width = max(len(r) for r in out["prompt_ids"])
ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in out["prompt_ids"]])
mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in out["prompt_ids"]])
gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=spec["new_tokens"])
out["batch_tokens"] = gen[:, width:].tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory) -> Path:  # noqa: F811 (the fixture imported above)
    model = TorchModel(task="text-generation", name="tiny-llama", module=tiny("llama"), tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("optimum") / "onnx"
    export_decoder(model, folder, steps=8)
    return folder


def _plain_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _prefill_feeds(session: ort.InferenceSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values."):
            feeds[arg.name] = np.zeros((ids.shape[0], arg.shape[1], 0, arg.shape[3]), dtype=np.float32)
    return feeds


def test_exported_logits_to_keep_is_optional(exported):
    session = _plain_session(exported / ONNX_FILE)
    assert "logits_to_keep" not in [i.name for i in session.get_inputs()]
    assert "logits_to_keep" in [i.name for i in session.get_overridable_initializers()]
    ids = np.array([[5, 17, 42, 99, 7, 3], [8, 8, 120, 64, 2, 11]], dtype=np.int64)
    feeds = _prefill_feeds(session, ids)
    unfed = session.run(["logits"], feeds)[0]
    assert unfed.shape == (2, 6, 400)  # not fed: every position, as a consumer unaware of the input gets
    every = session.run(["logits"], {**feeds, "logits_to_keep": np.array(0, dtype=np.int64)})[0]
    last = session.run(["logits"], {**feeds, "logits_to_keep": np.array(1, dtype=np.int64)})[0]
    np.testing.assert_array_equal(unfed, every)
    assert last.shape == (2, 1, 400)
    np.testing.assert_allclose(last[:, 0], unfed[:, -1], atol=1e-5)
    # edgesmith's own loop still asks for the last position only
    _, decoder = open_decoder(exported, threads=1)
    try:
        assert decoder._has_keep
        np.testing.assert_allclose(decoder.prefill(ids, np.ones_like(ids)), unfed[:, -1], atol=1e-5)
    finally:
        decoder.close()


def test_tokenizer_config_names_a_class_transformers_4_has(exported, tokenizer, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "TokenizersBackend"  # what transformers 5 writes, and transformers 4 cannot load
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(exported)  # transformers 5 still loads it
    for prompt in PROMPTS:
        assert prompt_ids(loaded, prompt) == prompt_ids(tokenizer, prompt)
        assert loaded(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]


def test_portable_tokenizer_class_leaves_other_classes(tmp_path):
    assert portable_tokenizer_class(tmp_path) is None  # no tokenizer config: nothing written
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    assert portable_tokenizer_class(tmp_path) == "TokenizersBackend"  # no tokenizer.json: nothing to load it from
    (tmp_path / "tokenizer.json").write_text("{}")
    assert portable_tokenizer_class(tmp_path) == "PreTrainedTokenizerFast"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    assert portable_tokenizer_class(tmp_path) == "GPT2Tokenizer"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"tokenizer_class": "GPT2Tokenizer"}


def _head_graph() -> onnx.ModelProto:
    """hidden [batch, seq, 4] -> MatMul -> logits [batch, seq, 5]: an LM head alone."""
    weight = np.arange(20, dtype=np.float32).reshape(4, 5) / 7
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["logits"], name="lm_head")], "head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 5])],
        [numpy_helper.from_array(weight, "lm_head.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_genai_logits_to_keep_is_optional_too():
    model = _head_graph()
    assert add_logits_to_keep(model.graph)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    unfed = session.run(["logits"], {"hidden": hidden})[0]
    np.testing.assert_allclose(unfed, hidden @ (np.arange(20, dtype=np.float32).reshape(4, 5) / 7), rtol=1e-5)
    for keep in (1, 2):
        kept = session.run(["logits"], {"hidden": hidden, "logits_to_keep": np.array(keep, dtype=np.int64)})[0]
        np.testing.assert_array_equal(kept, unfed[:, -keep:])


def test_set_input_default_checks_the_input():
    graph = _head_graph().graph
    graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, []))
    with pytest.raises(ValueError, match="no input 'missing'"):
        set_input_default(graph, "missing", np.array(0, dtype=np.int64))
    with pytest.raises(ValueError, match="int32 of rank 0; the input is a int64"):
        set_input_default(graph, "k", np.array(0, dtype=np.int32))
    with pytest.raises(ValueError, match="rank 1"):
        set_input_default(graph, "k", np.array([0], dtype=np.int64))
    set_input_default(graph, "k", np.array(3, dtype=np.int64))
    set_input_default(graph, "k", np.array(0, dtype=np.int64))  # replaces the first default
    defaults = [numpy_helper.to_array(i) for i in graph.initializer if i.name == "k"]
    assert len(defaults) == 1 and defaults[0] == 0


def _optimum_generate(folder: Path, prompts: list[str], new_tokens: int) -> dict:
    """OPTIMUM_SCRIPT in bench/.venv-optimum's python, offline."""
    spec = importlib.util.spec_from_file_location("optimum_env", REPO / "bench" / "optimum_env.py")
    optimum_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(optimum_env)  # where the bench (and conftest's skip) find the venv
    python = optimum_env.python()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    done = subprocess.run([str(python), "-c", OPTIMUM_SCRIPT], input=json.dumps(
        {"folder": str(folder), "prompts": prompts, "new_tokens": new_tokens}), capture_output=True, text=True,
        env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _edgesmith_generate(folder: Path, prompts: list[str], new_tokens: int) -> dict:
    artifact, session = open_decoder(folder, threads=2)
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    try:
        return {"prompt_ids": [prompt_ids(artifact.tokenizer, p) for p in prompts],
                "tokens": [generate(session, artifact.tokenizer, p, cfg).token_ids for p in prompts],
                "batch_tokens": [r.token_ids for r in generate_batch(session, artifact.tokenizer, prompts, cfg)],
                "eos": list(session.eos_token_ids)}
    finally:
        session.close()


def _until_eos(rows: list[list[int]], eos: list[int]) -> list[list[int]]:
    """Each row cut after its first stop token (Optimum pads a batch's finished rows)."""
    out = []
    for row in rows:
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        out.append(row if stop is None else row[:stop + 1])
    return out


def _assert_same_generation(folder: Path, prompts: list[str]) -> dict:
    ours = _edgesmith_generate(folder, prompts, NEW_TOKENS)
    theirs = _optimum_generate(folder, prompts, NEW_TOKENS)
    assert theirs["tokenizer"] == "PreTrainedTokenizerFast"
    assert theirs["prompt_ids"] == ours["prompt_ids"]  # transformers 4.57's tokenizer and chat template
    assert _until_eos(theirs["tokens"], ours["eos"]) == ours["tokens"]
    assert _until_eos(theirs["batch_tokens"], ours["eos"]) == ours["batch_tokens"]
    return ours


@pytest.mark.optimum
def test_optimum_generates_edgesmiths_greedy_tokens(exported):
    ours = _assert_same_generation(exported, PROMPTS)
    assert sum(len(t) for t in ours["tokens"]) >= len(PROMPTS) * 4  # not three empty answers compared


@pytest.mark.optimum
@pytest.mark.slow
def test_optimum_runs_the_packaged_smollm2_export(tmp_path):
    from edgesmith.artifacts import load
    from edgesmith.gguf import source

    model = load(Path(source.gguf_to_folder(source.smollm2_gguf_path())))
    folder = tmp_path / "smollm2"
    export_decoder(model, folder, threads=2, steps=4)
    ours = _assert_same_generation(folder, ["What is the capital of France?", "Name a colour."])
    assert all(len(t) >= 4 for t in ours["tokens"])
