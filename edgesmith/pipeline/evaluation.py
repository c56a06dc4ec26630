"""Quality of every artifact of a run against its source model, cached by content."""

from __future__ import annotations

import logging

from rich.console import Console

from edgesmith.artifacts import Artifact
from edgesmith.cache import StepCache, package_versions
from edgesmith.data import TextData
from edgesmith.recipe import SOURCE_ID, Recipe
from edgesmith.storage import read_json, sha256_json, write_json_atomic

log = logging.getLogger(__name__)


def evaluate_all(recipe: Recipe, artifacts: dict[str, Artifact], data: TextData, cache: StepCache,
                 console: Console) -> dict[str, dict[str, float]]:
    """{artifact id: metrics}; each under a key of (artifact, source, texts, k, versions) in the cache."""
    from edgesmith.quality import evaluate, reference_outputs

    source = artifacts[SOURCE_ID]
    texts, labels = data.texts, data.labels
    metrics_dir = cache.root / "metrics"
    reference = None
    results: dict[str, dict[str, float]] = {}
    source_hash = source.content_hash()
    for art_id, art in artifacts.items():
        key = sha256_json({"artifact": art.content_hash(), "reference": source_hash,
                           "texts": sha256_json([texts, labels]), "k": recipe.evaluate.k,
                           "versions": package_versions()})
        path = metrics_dir / f"{key}.json"
        saved = read_json(path)
        if isinstance(saved, dict) and all(isinstance(v, (int, float)) for v in saved.values()):
            results[art_id] = saved
            continue
        if path.exists():
            log.warning("cached metrics %s are damaged; computing them again", path)
        with console.status(f"evaluating {art_id} on {len(texts)} texts …"):
            if reference is None:
                reference = reference_outputs(source, texts, batch_size=recipe.evaluate.batch_size)
            results[art_id] = evaluate(art, source, texts, labels, k=recipe.evaluate.k, reference_embeddings=reference,
                                       candidate_outputs=reference if art is source else None,
                                       batch_size=recipe.evaluate.batch_size)
        write_json_atomic(path, results[art_id])
    return results
