"""Calibration batches, training passages and the validation KL of the GGUF quantizer.

Everything comes from the calibration side of the shipped corpus (sentences before
:data:`edgesmith.lm_quality.HELDOUT_START`), so the held-out passages that the verdict scores are
never calibrated or trained on. Calibration passages start at sentence 0, the validation passages
at 2,000 and the training passages at 4,000, so the three do not overlap either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.errors import BadInput
from edgesmith.lm_quality import (
    HELDOUT_START,
    SENTENCE_ENDS,
    calibration_batches,
    calibration_texts,
    pad_batches,
    pad_id_of,
    passages,
)

#: passages per calibration batch
BATCH = 8


def token_batches(tokenizer, *, count: int, tokens: int, offset: int = 0, texts: list[str] | None = None
                  ) -> list[dict[str, torch.Tensor]]:
    """``count`` passages of ~``tokens`` tokens (from corpus sentence ``offset`` on, or from the
    user's ``texts``), left-padded in batches of :data:`BATCH`, as torch feeds."""
    if texts is None:
        batches = calibration_batches(tokenizer, count=count, tokens=tokens, batch_size=BATCH, offset=offset)
    else:
        seqs = passages(tokenizer, texts[offset % max(len(texts), 1):] + texts[:offset % max(len(texts), 1)],
                        count=count, tokens=tokens)
        batches = pad_batches(seqs, batch_size=BATCH, pad_id=pad_id_of(tokenizer))
    return [{"input_ids": torch.from_numpy(b.input_ids), "attention_mask": torch.from_numpy(b.attention_mask)}
            for b in batches]


def training_passages(tokenizer, *, tokens: int, count: int, offset: int, texts: list[str] | None = None
                      ) -> list[str]:
    """Up to ``count`` texts of at least ``tokens`` tokens each: consecutive corpus sentences (or the
    user's ``texts``) joined."""
    if texts is not None:
        sentences = list(texts)
    else:
        available = HELDOUT_START - offset
        if available < 1:
            raise BadInput(f"training passages start at sentence {offset}, past the calibration side of the corpus")
        sentences = calibration_texts(available, offset)
    lengths = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    out, current, size = [], [], 0
    for text, ids in zip(sentences, lengths, strict=True):
        text = text.strip()
        current.append(text if text.endswith(SENTENCE_ENDS) else text + ".")
        size += len(ids) + 1
        if size >= tokens:
            out.append(" ".join(current))
            current, size = [], 0
            if len(out) == count:
                break
    if not out:
        raise BadInput("the corpus gave no training passage; lower max_length")
    return out


def mean_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over real positions (nats)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    keep = mask.bool()
    return kl[keep].mean()


def kl_evaluator(batches: list[dict[str, torch.Tensor]], teacher: nn.Module) -> Callable[[nn.Module], float]:
    """``evaluate(objective) -> −KL`` on ``batches`` (higher is better, as the training loop wants)."""

    @torch.no_grad()
    def evaluate(objective: nn.Module) -> float:
        student = getattr(objective, "student", objective)
        total, n = 0.0, 0
        for batch in batches:
            t = teacher(**batch).logits
            s = student(**batch).logits
            real = int(batch["attention_mask"].sum())
            total += float(mean_kl(s, t, batch["attention_mask"])) * real
            n += real
        return -total / max(n, 1)

    return evaluate
