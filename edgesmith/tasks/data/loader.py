"""The documents of edgesmith's shipped tasks, built in memory from the JSONL beside this file.

lm-eval calls these through ``custom_dataset: !function loader.NAME``: nothing depends on the
working directory and nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(name: str) -> list[dict]:
    """The rows of ``NAME.jsonl`` beside this file."""
    path = HERE / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(name: str):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows(name))})


def mmlu_mini(**metadata):
    return _dataset("mmlu-mini")


def wordnet_mc(**metadata):
    return _dataset("wordnet-mc")


def smoke(**metadata):
    return _dataset("smoke")
