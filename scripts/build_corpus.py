"""Build the shipped general-English corpus from WordNet 3.0 (Debian package ``wordnet-base``).

Every example sentence that WordNet quotes inside a gloss becomes one JSON line with its text and
the lexicographer category of its synset (``noun.animal``, ``verb.motion`` ...), which is a real
label for classification tasks. Run once by a developer; the output is committed:

    apt-get install wordnet-base
    python scripts/build_corpus.py /usr/share/wordnet edgesmith/corpus/wordnet-examples.jsonl
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

# The lexicographer files of WordNet 3.0, in the order of their two-digit numbers (lexnames(5WN)).
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
QUOTED = re.compile(r'"([^"]+)"')


def examples(wordnet_dir: Path):
    for part in ("noun", "verb", "adj", "adv"):
        for line in (wordnet_dir / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            fields = line.split(" ", 3)
            category = LEXNAMES[int(fields[1])]
            gloss = line.split("|", 1)[1]
            for text in QUOTED.findall(gloss):
                text = " ".join(text.split())
                if 25 <= len(text) <= 200:
                    yield text, category


def main(wordnet_dir: str, out: str) -> None:
    seen: set[str] = set()
    rows = []
    for text, category in examples(Path(wordnet_dir)):
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": category})
    random.Random(0).shuffle(rows)  # fixed order: slices of the file are stable random samples
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} sentences -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
