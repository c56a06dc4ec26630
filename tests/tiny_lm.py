"""Tiny decoder ONNX folders for the weight-only and decoder-quality tests, built in seconds.

A byte-level BPE tokenizer (400 tokens) trained on 3,000 calibration-side corpus sentences, a random
LlamaForCausalLM with GQA (hidden 64, 2 layers, 4 heads / 2 KV heads, tied embeddings) and a
TorchScript export of it without a cache: inputs ``input_ids``, ``attention_mask`` (and, with
``with_past``, ``position_ids`` and empty ``past_key_values.N.key/value`` inputs as in the decoder
layout), output ``logits``. Until edgesmith's own decoder export exists this stands in for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

VOCAB = 400
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def train_tokenizer(folder: Path):
    """A byte-level BPE tokenizer saved into ``folder`` (tokenizer.json and config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgesmith.data import builtin_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(builtin_corpus(limit=3000, offset=1000), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def tiny_llama(seed: int = 0, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation="eager", bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a random init is nearly uniform; sharpen it so KL and top-1 mean something
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        model.model.norm.weight.mul_(3.0)
    return model


class _NoCache(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          use_cache=False).logits


class _WithPast(torch.nn.Module):
    """The decoder layout's inputs; the (empty) past only touches the output through a zero term."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits
        zero = sum(p.sum() for p in past) * 0.0
        return logits + zero


def export_decoder(model, tokenizer_folder: Path, folder: Path, *, with_past: bool = False,
                   name: str = "tiny-llama"):
    """Export ``model`` to an OnnxModel folder with config, tokenizer and meta["decoder"]."""
    import shutil

    from edgesmith.artifacts import OnnxModel

    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(3, cfg.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "logits": {0: "batch", 1: "seq"}}
    if with_past:
        past = [torch.zeros(2, cfg.num_key_value_heads, 0, head_dim) for _ in range(2 * cfg.num_hidden_layers)]
        names = [f"past_key_values.{i}.{kind}" for i in range(cfg.num_hidden_layers) for kind in ("key", "value")]
        args = (ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), *past)
        inputs = ["input_ids", "attention_mask", "position_ids", *names]
        dynamic.update({"position_ids": {0: "batch", 1: "seq"}})
        dynamic.update({n: {0: "batch", 2: "past"} for n in names})
        wrapper = _WithPast(model)
    else:
        args, inputs, wrapper = (ids, mask), ["input_ids", "attention_mask"], _NoCache(model)
    torch.onnx.export(wrapper, args, str(folder / "model.onnx"), dynamo=False, input_names=inputs,
                      output_names=["logits"], dynamic_axes=dynamic, opset_version=17)
    cfg.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for f in Path(tokenizer_folder).iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(f, folder / f.name)
    meta = {"decoder": {"layout": "edgesmith", "num_layers": cfg.num_hidden_layers,
                        "num_kv_heads": cfg.num_key_value_heads, "head_dim": head_dim,
                        "vocab_size": cfg.vocab_size, "max_positions": cfg.max_position_embeddings,
                        "eos_token_ids": [2], "bos_token_id": 1, "pad_token_id": 0, "logits": "all"}}
    artifact = OnnxModel(task="text-generation", name=name, meta=meta, folder=folder)
    artifact.save(folder)
    return artifact


def build_tiny_decoder(tmp_path_factory) -> SimpleNamespace:
    """The tokenizer, the torch model (a TorchModel) and its two ONNX exports (``plain``: input_ids
    and attention_mask; ``past``: the decoder layout's inputs with an empty cache); a few seconds."""
    from edgesmith.artifacts import TorchModel

    base = tmp_path_factory.mktemp("tiny-decoder")
    tokenizer = train_tokenizer(base / "tokenizer")
    model = tiny_llama()
    return SimpleNamespace(
        folder=base, tokenizer=tokenizer, module=model,
        torch=TorchModel(task="text-generation", name="tiny-llama", module=model, tokenizer=tokenizer),
        plain=export_decoder(model, base / "tokenizer", base / "plain"),
        past=export_decoder(model, base / "tokenizer", base / "past", with_past=True))
