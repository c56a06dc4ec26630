"""A real classifier to show early exit on: MiniLM fine-tuned on the shipped WordNet categories.

The shipped corpus (``builtin:wordnet``) labels each example sentence with its synset's
lexicographer category (45 classes). This keeps the ``--classes`` most frequent categories,
shuffles the rows with a fixed seed and splits them into test / calibration / dev / train rows;
the packaged MiniLM gets a classification head and is fine-tuned (lightly: a few hundred steps,
all weights) with edgesmith's training loop on the train rows, picked by accuracy on the dev rows,
and saved as a standard Hugging Face ``BertForSequenceClassification`` folder (not committed: the
benchmark creates it).

    .venv/bin/python bench/wordnet_classifier.py --out bench/.cache/minilm-wordnet --steps 400
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("bench.wordnet_classifier")

SPLIT_SEED = 0


@dataclass
class Splits:
    labels: list[str]  # the kept categories, most frequent first
    test: tuple[list[str], list[str]]
    calibration: tuple[list[str], list[str]]
    dev: tuple[list[str], list[str]]
    train: tuple[list[str], list[str]]


def wordnet_splits(classes: int = 8, test: int = 2000, calibration: int = 1500, dev: int = 500) -> Splits:
    """Rows of the ``classes`` most frequent categories, shuffled (seed 0), cut into four parts."""
    from edgesmith.data import load_texts

    data = load_texts("builtin:wordnet", label_field="label")
    kept = [name for name, _ in Counter(data.labels).most_common(classes)]
    rows = [(t, lab) for t, lab in zip(data.texts, data.labels) if lab in kept]
    random.Random(SPLIT_SEED).shuffle(rows)

    def part(a: int, b: int | None) -> tuple[list[str], list[str]]:
        chunk = rows[a:b]
        return [t for t, _ in chunk], [lab for _, lab in chunk]

    c1, c2, c3 = test, test + calibration, test + calibration + dev
    return Splits(kept, part(0, c1), part(c1, c2), part(c2, c3), part(c3, None))


class ClassifierObjective(nn.Module):
    """Cross-entropy of a sequence classifier on labelled batches (for edgesmith.training.train)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch.get("token_type_ids"), labels=batch["labels"])
        return {"loss": out.loss}


def accuracy(model: nn.Module, tokenizer, texts: list[str], labels: list[int], max_length: int = 64) -> float:
    from edgesmith.training import padded_batches

    correct = 0
    model.eval()
    with torch.no_grad():
        for rows, batch in padded_batches(tokenizer, texts, batch_size=64, max_length=max_length,
                                          input_names=["input_ids", "attention_mask", "token_type_ids"]):
            pred = model(**batch).logits.argmax(-1)
            correct += int((pred == torch.tensor([labels[i] for i in rows])).sum())
    return correct / len(texts)


def build_classifier(out: Path, *, classes: int = 8, steps: int = 400, lr: float = 1e-4, batch_size: int = 32,
                     max_length: int = 64, progress: bool = True) -> dict:
    """Fine-tune MiniLM on the WordNet categories and save it to ``out``; returns what it reached."""
    from transformers import BertForSequenceClassification

    from edgesmith.artifacts import default_model_path, load_tokenizer
    from edgesmith.storage import atomic_dir
    from edgesmith.training import TextBatches, TrainSettings, train

    splits = wordnet_splits(classes)
    label2id = {name: i for i, name in enumerate(splits.labels)}
    source = default_model_path()
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=len(label2id), label2id=label2id, id2label={i: n for n, i in label2id.items()})
    train_texts, train_labels = splits.train
    dev_texts, dev_labels = splits.dev
    dev_ids = [label2id[x] for x in dev_labels]
    data = TextBatches(tokenizer, train_texts, batch_size=batch_size, max_length=max_length, seed=0,
                       input_names=["input_ids", "attention_mask", "token_type_ids"],
                       labels=[label2id[x] for x in train_labels])
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, eval_every=max(50, steps // 4),
                             max_length=max_length, precision="fp32", warmup_ratio=0.1)
    settings.checkpoint_every = 50  # a killed run resumes where it stopped
    key = f"wordnet-classifier-{classes}-{steps}-{lr}-{batch_size}-{max_length}"
    result = train(ClassifierObjective(model), data, settings,
                   evaluate=lambda objective: accuracy(objective.model, tokenizer, dev_texts, dev_ids, max_length),
                   checkpoint_dir=out.parent / f"{out.name}-checkpoints", key=key,
                   progress=progress, device=torch.device("cpu"), label="classifier")
    model.eval()
    test_texts, test_labels = splits.test
    summary = {"classes": splits.labels, "train_rows": len(train_texts), "dev_accuracy": result.best_metric,
               "test_accuracy": accuracy(model, tokenizer, test_texts, [label2id[x] for x in test_labels], max_length),
               "majority_class_share": Counter(test_labels).most_common(1)[0][1] / len(test_labels),
               "steps": result.steps_run, "train_seconds": round(result.seconds, 1)}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "wordnet-classifier.json").write_text(json.dumps(summary, indent=2))
    log.info("classifier: test accuracy %.4f (majority class %.4f)", summary["test_accuracy"],
             summary["majority_class_share"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/.cache/minilm-wordnet"))
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(build_classifier(args.out, classes=args.classes, steps=args.steps, lr=args.lr), indent=2))


if __name__ == "__main__":
    main()
