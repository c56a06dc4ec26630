"""Decoder export with a KV cache (edgesmith.export.decoder) and the generation runtime
(edgesmith.runtimes.generation), on tiny random causal LMs built here (Llama with GQA, Qwen2,
GPT-2) and a byte-level BPE tokenizer trained here with a chat template."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgesmith.artifacts import ONNX_FILE, OnnxModel, TorchModel, load
from edgesmith.errors import BadInput, ValidationFailed
from edgesmith.export import decoder as decoder_export
from edgesmith.export.decoder import export_decoder, validate_decoder
from edgesmith.runtimes.generation import (
    GenerationConfig,
    TextStream,
    choose_next,
    decode_loop,
    generate,
    generate_batch,
    left_pad,
    load_decoder,
    prompt_ids,
)
from edgesmith.runtimes.onnxruntime import OrtDecoderSession
from edgesmith.runtimes.torch import TorchDecoderSession

VOCAB = 400
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["The cocks crowed", "she looked meek but had the heart of a lion, they said", "a signal"]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of VOCAB tokens trained on the shipped corpus (characters such as é and
    emoji span several tokens), with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgesmith.data import builtin_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(builtin_corpus(limit=500), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny(family: str):
    import transformers

    torch.manual_seed({"llama": 0, "qwen2": 1, "gpt2": 2, "gemma3": 3}[family])
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gemma3":  # sliding-window layers, the window shorter than probe + decode
        config = transformers.Gemma3TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                               vocab_size=VOCAB, max_position_embeddings=256, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"], **ids)
        return transformers.Gemma3ForCausalLM(config).eval()
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                          max_position_embeddings=256, **ids)
        return transformers.LlamaForCausalLM(config).eval()
    if family == "qwen2":
        config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                          max_position_embeddings=256, **ids)
        return transformers.Qwen2ForCausalLM(config).eval()
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, **ids)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama(tokenizer) -> TorchModel:
    return TorchModel(task="text-generation", name="tiny-llama", module=tiny("llama"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def llama_onnx(llama, tmp_path_factory) -> OnnxModel:
    return export_decoder(llama, tmp_path_factory.mktemp("llama") / "onnx")


def test_llama_gqa_export_validates_and_loads(llama, llama_onnx):
    folder = llama_onnx.folder
    for name in (ONNX_FILE, "config.json", "generation_config.json", "tokenizer.json", "edgesmith.json"):
        assert (folder / name).exists(), name
    record = llama_onnx.meta["decoder"]
    assert record == {**record, "layout": "edgesmith", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
                      "vocab_size": VOCAB, "max_positions": 256, "eos_token_ids": [2], "bos_token_id": 1,
                      "pad_token_id": 0, "logits": "selectable"}
    check = llama_onnx.meta["validation"]
    assert check["probe"] == "tokenizer" and len(set(check["prompt_tokens"])) == 3  # different lengths
    assert check["tokens_equal"] == [32, 32, 32] and check["prefill_max_abs"] < 1e-4
    graph = onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert inputs[:4] == ["input_ids", "attention_mask", "position_ids", "logits_to_keep"]
    assert inputs[4:] == [f"past_key_values.{i}.{t}" for i in range(2) for t in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits"] + [f"present.{i}.{t}" for i in range(2) for t in ("key", "value")]
    loaded = load(folder)
    assert isinstance(loaded, OnnxModel) and loaded.task == "text-generation"
    assert loaded.meta["decoder"]["layout"] == "edgesmith" and loaded.tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma3"])
def test_export_without_tokenizer(family, tmp_path):
    model = TorchModel(task="text-generation", name=f"tiny-{family}", module=tiny(family))
    onnx_model = export_decoder(model, tmp_path / family)
    check = onnx_model.meta["validation"]
    assert check["probe"] == "random ids" and check["tokens_equal"] == [32, 32, 32]
    assert check["decode_max_abs"] < 1e-4
    assert onnx_model.meta["decoder"]["num_kv_heads"] == (4 if family == "gpt2" else 2)


def test_logits_to_keep_selects_positions(llama, llama_onnx, tokenizer):
    ids, mask = left_pad([prompt_ids(tokenizer, p, chat=False) for p in PROMPTS], tokenizer.pad_token_id)
    session = OrtDecoderSession(llama_onnx)
    every = session.logits(ids, mask)
    assert every.shape == (3, ids.shape[1], VOCAB)
    last = session.prefill(ids, mask)
    np.testing.assert_allclose(last, every[:, -1], atol=1e-5)
    reference = TorchDecoderSession(llama).logits(ids, mask)
    real = mask.astype(bool)
    assert np.abs(reference - every)[real].max() < 1e-4
    assert session.providers == ["CPUExecutionProvider"]
    assert session.options["allow_spinning"] is False


def _hf_greedy(module, ids, mask, new_tokens):
    config = copy.deepcopy(module.generation_config)
    config.eos_token_id = None
    with torch.inference_mode():
        out = module.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              generation_config=config, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def test_kv_cache_equals_full_recompute_and_hf_generate_with_left_padding(llama, llama_onnx, tokenizer):
    rows = [prompt_ids(tokenizer, p, chat=False) for p in PROMPTS]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    assert (mask == 0).any()
    new = 12
    cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)
    session = OrtDecoderSession(llama_onnx)
    cached = decode_loop(session, ids, mask, cfg).tokens
    # the same greedy tokens by recomputing the whole sequence every step (no cache)
    seq, seq_mask, recomputed = ids, mask, []
    for _ in range(new):
        token = session.logits(seq, seq_mask)[:, -1].argmax(axis=-1)
        recomputed.append(token)
        seq = np.concatenate([seq, token[:, None]], axis=1)
        seq_mask = np.concatenate([seq_mask, np.ones((len(seq), 1), dtype=np.int64)], axis=1)
    torch_cached = decode_loop(TorchDecoderSession(llama), ids, mask, cfg).tokens
    hf = _hf_greedy(llama.module, ids, mask, new)
    np.testing.assert_array_equal(cached, np.stack(recomputed, axis=1))
    np.testing.assert_array_equal(cached, torch_cached)
    np.testing.assert_array_equal(cached, hf)
    # each row alone (no padding) gives the same tokens as in the padded batch
    for row, prompt in enumerate(rows):
        alone = decode_loop(session, np.array([prompt]), None, cfg).tokens
        np.testing.assert_array_equal(alone[0], cached[row])


def test_broken_graph_fails_and_writes_nothing(llama, tmp_path, monkeypatch):
    real_export = decoder_export.export_decoder_graph

    def perturbed(module, path, shape, **kw):
        real_export(module, path, shape, **kw)
        graph = onnx.load(str(path))
        biggest = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(biggest).copy()
        values.flat[::10] += 0.05  # one weight tensor slightly off
        biggest.CopyFrom(onnx.numpy_helper.from_array(values, biggest.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(decoder_export, "export_decoder_graph", perturbed)
    out = tmp_path / "broken"
    with pytest.raises(ValidationFailed, match="prefill logits max abs diff"):
        export_decoder(llama, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["zeroed", "dropped"])
def test_decoder_that_ignores_its_cache_fails_at_the_first_decode_step(fault, llama, tmp_path, monkeypatch):
    real_wrapper = decoder_export.decoder_wrapper

    def forgetful(module):
        inner = real_wrapper(module)

        class Forget(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, *past):
                if fault == "zeroed":  # the cache's values are lost
                    return self.inner(input_ids, attention_mask, position_ids, logits_to_keep, *(p * 0 for p in past))
                seq = input_ids.shape[1]  # the cache is dropped: every step sees only its own token
                return self.inner(input_ids, attention_mask[:, -seq:], position_ids, logits_to_keep,
                                  *(p[:, :, :0] for p in past))

        return Forget().eval()

    monkeypatch.setattr(decoder_export, "decoder_wrapper", forgetful)
    out = tmp_path / "forgetful"
    with pytest.raises(ValidationFailed, match="step 1 "):
        export_decoder(llama, out)
    assert not out.exists()


def test_validate_decoder_against_another_model_fails(llama, llama_onnx):
    other = TorchModel(task="text-generation", name="other", module=tiny("qwen2"))
    with pytest.raises(ValidationFailed):
        validate_decoder(other, llama_onnx.folder, [[5, 6, 7], [8, 9, 10, 11, 12]], steps=4)
    assert validate_decoder(llama, llama_onnx.folder, [[5, 6, 7], [8, 9, 10, 11, 12]], steps=4)["tokens_equal"] == [4, 4]


def test_choose_next_greedy_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]]))
    assert choose_next(logits, GenerationConfig(), rng).tolist() == [1, 0]
    assert choose_next(logits, GenerationConfig(temperature=1.0, top_k=1), rng).tolist() == [1, 0]
    assert choose_next(logits, GenerationConfig(temperature=1.0, top_p=0.3), rng).tolist() == [1, 0]
    draws = np.stack([choose_next(logits, GenerationConfig(temperature=1.0, top_k=2), rng) for _ in range(400)])
    assert set(draws[:, 0]) == {1, 3}
    draws = np.stack([choose_next(logits, GenerationConfig(temperature=1.0, top_p=0.8), rng) for _ in range(400)])
    assert set(draws[:, 0]) == {1, 3, 2}  # 0.5 + 0.25 < 0.8, so the third most likely joins
    counts = np.bincount(np.stack([choose_next(logits, GenerationConfig(temperature=1.0), rng)
                                   for _ in range(2000)])[:, 1], minlength=4)
    assert 1250 < counts[0] < 1550  # p = 0.7
    with pytest.raises(BadInput):
        GenerationConfig(top_p=0)


def test_seeded_sampling_is_reproducible(llama_onnx, tokenizer):
    session = load_decoder(llama_onnx, threads=1)
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.2, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    first = generate(session, tokenizer, "The cocks crowed", cfg)
    again = generate(session, tokenizer, "The cocks crowed", cfg)
    other = generate(session, tokenizer, "The cocks crowed", GenerationConfig(**{**cfg.__dict__, "seed": 8}))
    assert first.token_ids == again.token_ids and first.text == again.text
    assert len(first.token_ids) == 16 and first.finish_reason == "length"
    assert other.token_ids != first.token_ids
    assert len(first.latencies_ms) == 15 and first.ttft_ms > 0 and first.providers == ["CPUExecutionProvider"]


def test_stop_tokens_and_stop_strings_stop(llama_onnx, tokenizer):
    session = load_decoder(llama_onnx)
    free = generate(session, tokenizer, "she looked meek", GenerationConfig(max_new_tokens=20, ignore_eos=True,
                                                                              chat=False))
    stop_at = next(i for i in range(2, 20) if free.token_ids[i] not in free.token_ids[:i])
    stopped = generate(session, tokenizer, "she looked meek",
                       GenerationConfig(max_new_tokens=20, chat=False, stop_token_ids=[free.token_ids[stop_at]]))
    assert stopped.finish_reason == "stop_token" and stopped.token_ids == free.token_ids[:stop_at + 1]
    text = free.text
    assert len(text) > 6
    cut = text[3:6]
    start = text.find(cut)
    streamed: list[str] = []
    by_string = generate(session, tokenizer, "she looked meek",
                         GenerationConfig(max_new_tokens=20, chat=False, stop_strings=[cut]), on_token=streamed.append)
    assert by_string.finish_reason == "stop_string" and by_string.text == text[:start]
    assert "".join(streamed) == by_string.text
    # the model's EOS stops generation unless ignore_eos
    forced = GenerationConfig(max_new_tokens=20, chat=False, stop_token_ids=None)
    eos_session = load_decoder(llama_onnx)
    eos_session.eos_token_ids = [free.token_ids[stop_at]]
    assert generate(eos_session, tokenizer, "she looked meek", forced).finish_reason in ("stop_token", "length")
    assert len(generate(eos_session, tokenizer, "she looked meek",
                        GenerationConfig(max_new_tokens=20, chat=False, ignore_eos=True)).token_ids) == 20


def test_chat_template_is_applied(tokenizer, llama_onnx):
    chat = prompt_ids(tokenizer, "hello")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
    assert chat == list(expected) and chat[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt_ids(tokenizer, "hello", chat=False) == tokenizer("hello")["input_ids"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert prompt_ids(tokenizer, messages)[:3] == tokenizer("<|im_start|>system\n")["input_ids"][:3]
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert prompt_ids(plain, "hello") == tokenizer("hello")["input_ids"]
    with pytest.raises(BadInput, match="chat template"):
        prompt_ids(plain, messages)
    session = load_decoder(llama_onnx)
    result = generate(session, tokenizer, "hello", GenerationConfig(max_new_tokens=3, ignore_eos=True))
    assert result.prompt_tokens == len(chat)


def test_stream_decodes_multibyte_characters_whole(tokenizer):
    text = "naïve café 😀 ok"
    ids = tokenizer(text)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens are partial characters
    stream = TextStream(tokenizer, skip_ids=tokenizer.all_special_ids)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_batch_generation_with_left_padding_matches_single_prompts(llama_onnx, tokenizer):
    session = load_decoder(llama_onnx)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True, chat=False)
    batch = generate_batch(session, tokenizer, PROMPTS, cfg)
    for prompt, result in zip(PROMPTS, batch):
        assert generate(session, tokenizer, prompt, cfg).token_ids == result.token_ids


def test_bad_inputs(llama, llama_onnx, tokenizer):
    session = load_decoder(llama_onnx)
    with pytest.raises(BadInput, match="context"):
        generate(session, tokenizer, "word " * 300, GenerationConfig(chat=False))
    with pytest.raises(BadInput, match="before prefill"):
        OrtDecoderSession(llama_onnx).step(np.array([1]))
    with pytest.raises(BadInput, match="all padding"):
        session.prefill(np.array([[1, 2]]), np.array([[0, 0]]))
    with pytest.raises(BadInput, match="causal LM"):
        export_decoder(TorchModel(task="feature-extraction", name="enc", module=llama.module), "/nonexistent/x")
    with pytest.raises(BadInput, match="no tokenizer"):
        generate(session, None, "hi")


def _smollm2_fp32_folder() -> Path:
    """The FP32 SmolLM2 folder (the packaged GGUF dequantized once, cached)."""
    from edgesmith.gguf import source

    return Path(source.gguf_to_folder(source.smollm2_gguf_path()))


@pytest.mark.slow
def test_packaged_smollm2_exports_and_validates(tmp_path):
    folder = _smollm2_fp32_folder()
    model = load(folder)
    onnx_model = export_decoder(model, tmp_path / "smollm2", threads=2)
    check = onnx_model.meta["validation"]
    assert check["tokens_equal"] == [32, 32, 32] or check["ties"]
    assert onnx_model.meta["decoder"]["num_layers"] == 30 and onnx_model.meta["decoder"]["num_kv_heads"] == 3
    session = load_decoder(onnx_model, threads=2)
    result = generate(session, onnx_model.tokenizer, "What is the capital of France?",
                      GenerationConfig(max_new_tokens=12))
    assert "Paris" in result.text
