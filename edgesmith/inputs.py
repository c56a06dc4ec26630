"""Model inputs from text: tokenised, padded numpy feeds that every runtime accepts."""

from __future__ import annotations

import numpy as np

from edgesmith.errors import BadInput


def tokenize(tokenizer, texts: list[str], *, input_names: list[str], seq: int | None = None,
             max_length: int = 256) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` into int64 arrays named as the model's inputs.

    ``seq`` pads (or truncates) every row to exactly that length, as profiles need; without it,
    rows are padded to the longest text (at most ``max_length`` tokens).
    """
    if tokenizer is None:
        raise BadInput("this model has no tokenizer; save one beside the model (tokenizer.save_pretrained)")
    if seq is not None:
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    else:
        enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="np")
    feeds = {}
    for name in input_names:
        if name in enc:
            feeds[name] = enc[name].astype(np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(enc["input_ids"].shape[1]), enc["input_ids"].shape).astype(np.int64)
        else:
            raise BadInput(f"the model needs an input named '{name}', which its tokenizer does not produce")
    return feeds


def attention_mask_of(feeds: dict[str, np.ndarray]) -> np.ndarray:
    if "attention_mask" in feeds:
        return feeds["attention_mask"]
    return np.ones_like(feeds["input_ids"])


def batches(texts: list[str], size: int):
    for start in range(0, len(texts), size):
        yield texts[start:start + size]
