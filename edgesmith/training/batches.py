"""Training batches of texts tokenised once, padded to their longest row, drawn from length buckets.

The order of the batches is a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgesmith.errors import BadInput


class TextBatches:
    """Training batches of tokenised texts.

    Each epoch is a permutation drawn from ``(seed, epoch)``; the permutation is cut into chunks
    of ``bucket_batches`` batches, each chunk sorted by length and split into batches (so a batch
    holds texts of similar length and pads little), and the batches are shuffled. ``batch(step)``
    is a pure function of the step: resuming needs no data-loader state.
    """

    def __init__(self, tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int, seed: int,
                 input_names: Sequence[str], labels: Sequence[int] | None = None, bucket_batches: int = 50):
        if not texts:
            raise BadInput("no training texts; give a data file with at least a batch of texts")
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids: list[list[int]] = enc["input_ids"]
        self.labels = list(labels) if labels is not None else None
        self.batch_size = min(batch_size, len(self.ids))
        self.seed = seed
        self.input_names = list(input_names)
        self.bucket_batches = bucket_batches
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self.pad_id = int(pad)
        self.batches_per_epoch = max(1, len(self.ids) // self.batch_size)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.ids), generator=gen).tolist()
        order = order[: self.batches_per_epoch * self.batch_size]
        chunk = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: len(self.ids[i]))
            batches.extend(part[j:j + self.batch_size] for j in range(0, len(part), self.batch_size))
        shuffle = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in shuffle]
        self._epoch_cache = (epoch, batches)
        return batches

    def indices(self, micro_step: int) -> list[int]:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        return self._epoch(epoch)[index]

    def batch(self, micro_step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """The ``micro_step``-th batch, this rank's share of it, padded to its longest row."""
        rows = self.indices(micro_step)[rank::world_size]
        return self.collate(rows)

    def collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = self.ids[i]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            batch["token_type_ids"] = torch.zeros_like(ids)
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in rows], dtype=torch.long)
        return batch


def padded_batches(tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int,
                   input_names: Sequence[str]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Evaluation batches in length order, each with the positions of its texts in ``texts``."""
    data = TextBatches(tokenizer, texts, batch_size=batch_size, max_length=max_length, seed=0,
                       input_names=input_names)
    order = sorted(range(len(texts)), key=lambda i: len(data.ids[i]))
    return [(order[s:s + batch_size], data.collate(order[s:s + batch_size]))
            for s in range(0, len(order), batch_size)]
