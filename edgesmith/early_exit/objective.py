"""Self-distillation of the exit heads (the objective), every exit's outputs, and the training loop's metric.

:class:`ExitObjective` is the loss, :func:`exit_outputs` every exit's output on texts in the
policy's space, :class:`ExitValidation` the validation metric the training loop reads."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.early_exit.network import ExitNetwork, masked_mean
from edgesmith.training import padded_batches


class ExitObjective(nn.Module):
    """Loss of every early exit against the final output (KL or cosine); ``joint`` also trains the
    backbone and keeps its final output close to a frozen copy of the original."""

    def __init__(self, net: ExitNetwork, *, joint: bool, temperature: float):
        super().__init__()
        self.net = net
        self.joint = joint
        self.temperature = temperature
        self.teacher = copy.deepcopy(net.model).eval() if joint else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        if not joint:
            net.model.requires_grad_(False)

    def train(self, mode: bool = True) -> ExitObjective:
        super().train(mode)
        if not self.joint:
            self.net.model.eval()  # a frozen backbone: no dropout
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _final_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.teacher is not None
        wrapper = ExitNetwork(self.teacher, self.net.task, [self.net.depth], heads=nn.ModuleList())
        return wrapper(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))[-1]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        net = self.net
        if self.joint:
            outputs = net(ids, mask, tt)
            with torch.no_grad():
                target = self._final_target(batch)
            pairs = [(o, target) for o in outputs]  # the final output too: it must stay the original's
        else:
            with torch.no_grad():
                _, states = net(ids, mask, tt, with_hidden=True)
                target = net.exit_output(len(net.heads), states[-1], mask)
            pairs = [(net.exit_output(i, states[i], mask), target) for i in range(len(net.heads))]
        losses = [self._loss(out, tgt, mask) for out, tgt in pairs]
        return {"loss": torch.stack(losses).mean()}

    def _loss(self, out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.net.task == "sequence-classification":
            t = self.temperature
            return F.kl_div(F.log_softmax(out / t, dim=-1), F.softmax(target / t, dim=-1),
                            reduction="batchmean") * t * t
        return (1.0 - F.cosine_similarity(masked_mean(out, mask), masked_mean(target, mask), dim=-1)).mean()


def exit_outputs(net: ExitNetwork, tokenizer, texts: list[str], *, max_length: int, input_names: list[str],
                 batch_size: int = 64) -> list[np.ndarray]:
    """Every exit's output on ``texts`` in the policy's space: logits (N, classes) for classifiers,
    mean-pooled embeddings as (N, 1, hidden) for encoders (pooling a single token is the identity,
    so the policy and the quality measures read them as they read full token outputs)."""
    device = next(net.parameters()).device
    rows: list[list[np.ndarray]] = [[] for _ in net.exit_layers]
    order: list[int] = []
    net.eval()
    with torch.no_grad():
        for idx, batch in padded_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length,
                                         input_names=input_names):
            batch = {k: v.to(device) for k, v in batch.items()}
            outs = net(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            for i, out in enumerate(outs):
                if net.task == "feature-extraction":
                    out = masked_mean(out, batch["attention_mask"]).unsqueeze(1)
                rows[i].append(out.float().cpu().numpy())
            order.extend(idx)
    inverse = np.argsort(np.asarray(order))
    return [np.concatenate(r, axis=0)[inverse] for r in rows]


def single_token_mask(outputs: list[np.ndarray]) -> np.ndarray:
    return np.ones(outputs[0].shape[:2] if outputs[0].ndim == 3 else (outputs[0].shape[0], 1), dtype=np.int64)


class ExitValidation:
    """Validation metric for the training loop: mean over early exits of the agreement (classifiers)
    or cosine (encoders) with the final output, on held-out texts."""

    def __init__(self, net: ExitNetwork, tokenizer, texts: list[str], *, max_length: int, input_names: list[str]):
        self.net, self.tokenizer, self.texts = net, tokenizer, texts
        self.max_length, self.input_names = max_length, input_names

    def __call__(self, objective: nn.Module) -> float:
        outs = exit_outputs(self.net, self.tokenizer, self.texts, max_length=self.max_length,
                            input_names=self.input_names)
        final = outs[-1]
        scores = []
        for out in outs[:-1]:
            if self.net.task == "sequence-classification":
                scores.append(float((out.argmax(-1) == final.argmax(-1)).mean()))
            else:
                a, b = out[:, 0], final[:, 0]
                cos = (a * b).sum(-1) / np.clip(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12, None)
                scores.append(float(cos.mean()))
        return float(np.mean(scores)) if scores else 1.0
