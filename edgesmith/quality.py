"""Quality metrics: how much of the source model a compressed artifact kept, and the gates on it.

Every artifact runs on its own runtime (torch for ``TorchModel``, ONNX Runtime for ``OnnxModel``).
Encoders are compared by their sentence embeddings (mean-pooled ``last_hidden_state`` under the
attention mask, L2-normalised, as sentence-transformers does): mean and worst row cosine to the
source, and neighbour recall@k (do the same texts stay each other's nearest neighbours?).
Classifiers are compared by accuracy on labels when there are labels, and by agreement of their
predictions and cosine of their logits with the source.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, TorchModel
from edgesmith.errors import BadInput
from edgesmith.inputs import attention_mask_of, tokenize
from edgesmith.pooling import l2_normalize, mean_pool
from edgesmith.runtimes.base import Session, default_runtime_for, get_runtime

log = logging.getLogger(__name__)

EMBEDDING_OUTPUT = "last_hidden_state"
LOGITS_OUTPUT = "logits"

#: metrics measured against the source itself: the source scores 1.0 on them by definition
RELATIVE_METRICS = ("cosine", "cosine_min", "recall@k", "agreement", "logits_cosine", "top1")
#: metrics with an absolute value: the source's own value is the reference
ABSOLUTE_METRICS = ("accuracy",)
#: metrics where lower is better, and the largest allowed rise over the reference is the gate:
#: kld (KL divergence to the source, nats/token; the source's own is 0) and perplexity (vs the
#: source's own perplexity on the same held-out text)
LOWER_IS_BETTER = ("kld", "perplexity")
#: decoders' task accuracy (``task.mmlu-mini``, :mod:`edgesmith.tasks`): an absolute metric whose
#: reference is the source's accuracy on the same documents; the gate is the largest paired drop
TASK_PREFIX = "task."
_RECALL = re.compile(r"^recall@(\d+)$")


# ---------------------------------------------------------------------------------------------
# Running artifacts
# ---------------------------------------------------------------------------------------------


def tokenizer_of(artifact: Artifact):
    """The artifact's tokenizer; BadInput when it has none."""
    tokenizer = getattr(artifact, "tokenizer", None)
    if tokenizer is None:
        raise BadInput(f"model '{artifact.name}' has no tokenizer; save one beside the model (tokenizer.save_pretrained)")
    return tokenizer


def open_session(artifact: Artifact, **options: Any) -> Session:
    """A session on the artifact's own runtime (torch or onnxruntime)."""
    return get_runtime(default_runtime_for(artifact)).load(artifact, **options)


def _length_order(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Indices of ``texts`` from shortest to longest in tokens, so batches pad little."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=256)["input_ids"]]
    return np.argsort(np.asarray(lengths), kind="stable")


def _pick_output(outputs: dict[str, np.ndarray], wanted: str, ndim: int) -> np.ndarray:
    if wanted in outputs:
        return outputs[wanted]
    for name, value in outputs.items():
        if value.ndim == ndim:
            log.debug("no output named %s; using %s", wanted, name)
            return value
    raise BadInput(f"the model has no '{wanted}' output (outputs: {', '.join(outputs)}); "
                   f"evaluate needs a {ndim}-D '{wanted}'")


def _run_batches(artifact: Artifact, texts: Sequence[str], *, batch_size: int, session: Session | None,
                 reduce) -> np.ndarray:
    """Run ``texts`` in length-sorted batches; ``reduce(outputs, feeds)`` gives one row per text."""
    if not texts:
        raise BadInput("no texts to evaluate on; give at least one text")
    if batch_size < 1:
        raise BadInput(f"batch_size must be at least 1 (got {batch_size})")
    tokenizer = tokenizer_of(artifact)
    own = session is None
    session = session or open_session(artifact)
    try:
        order = _length_order(tokenizer, texts)
        rows: list[np.ndarray] = []
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start:start + batch_size]]
            feeds = tokenize(tokenizer, chunk, input_names=session.input_names)
            rows.append(reduce(session.run(feeds), feeds))
    finally:
        if own:
            session.close()
    result = np.concatenate(rows, axis=0)
    out = np.empty_like(result)
    out[order] = result
    return out


def embed(artifact: Artifact, texts: Sequence[str], *, batch_size: int = 32,
          session: Session | None = None) -> np.ndarray:
    """Sentence embeddings of ``texts``: mean-pooled ``last_hidden_state``, L2-normalised.

    Returns a float32 array of shape (len(texts), hidden). ``session`` reuses a loaded session.
    """
    if artifact.task != "feature-extraction":
        raise BadInput(f"embed needs a feature-extraction model; '{artifact.name}' is {artifact.task} "
                       "(use logits() for classifiers)")

    def reduce(outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> np.ndarray:
        hidden = _pick_output(outputs, EMBEDDING_OUTPUT, 3)
        return mean_pool(hidden, attention_mask_of(feeds))

    pooled = _run_batches(artifact, texts, batch_size=batch_size, session=session, reduce=reduce)
    return l2_normalize(pooled).astype(np.float32)


def logits(artifact: Artifact, texts: Sequence[str], *, batch_size: int = 32,
           session: Session | None = None) -> np.ndarray:
    """Classifier logits of ``texts``, shape (len(texts), num_labels)."""
    if artifact.task != "sequence-classification":
        raise BadInput(f"logits needs a sequence-classification model; '{artifact.name}' is {artifact.task}")

    def reduce(outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> np.ndarray:
        return _pick_output(outputs, LOGITS_OUTPUT, 2).astype(np.float32)

    return _run_batches(artifact, texts, batch_size=batch_size, session=session, reduce=reduce)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b``."""
    if a.shape != b.shape:
        raise BadInput(f"cannot compare outputs of shapes {a.shape} and {b.shape}")
    a64, b64 = l2_normalize(a.astype(np.float64)), l2_normalize(b.astype(np.float64))
    return np.clip((a64 * b64).sum(axis=-1), -1.0, 1.0)


def _top_k_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k most similar other rows (itself excluded)."""
    unit = l2_normalize(embeddings.astype(np.float64))
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def neighbour_recall(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean over texts of |top-k neighbours by the reference ∩ top-k by the candidate| / k."""
    n = reference.shape[0]
    if k < 1:
        raise BadInput(f"k must be at least 1 (got {k})")
    if n <= k:
        raise BadInput(f"neighbour recall@{k} needs more than {k} texts (got {n}); give more texts or a smaller k")
    ref_nn, cand_nn = _top_k_neighbours(reference, k), _top_k_neighbours(candidate, k)
    overlaps = [len(set(r.tolist()) & set(c.tolist())) for r, c in zip(ref_nn, cand_nn)]
    return float(np.mean(overlaps) / k)


def fidelity(reference_embeddings: np.ndarray, candidate_embeddings: np.ndarray, k: int = 10) -> dict[str, float]:
    """Cosine (mean and worst row) and neighbour recall@k of candidate embeddings vs the reference."""
    cos = row_cosines(reference_embeddings, candidate_embeddings)
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        f"recall@{k}": neighbour_recall(reference_embeddings, candidate_embeddings, k),
    }


def label_map(artifact: Artifact) -> dict[str, int]:
    """``label2id`` from the artifact's config (the module's, or config.json beside an ONNX file)."""
    mapping: dict[str, Any] = {}
    if isinstance(artifact, TorchModel) and artifact.config is not None:
        mapping = dict(getattr(artifact.config, "label2id", None) or {})
        if not mapping and getattr(artifact.config, "id2label", None):
            mapping = {str(v): int(k) for k, v in artifact.config.id2label.items()}
    elif getattr(artifact, "folder", None) is not None and (artifact.folder / "config.json").exists():
        config = json.loads((artifact.folder / "config.json").read_text())
        mapping = dict(config.get("label2id") or {})
        if not mapping and config.get("id2label"):
            mapping = {str(v): int(k) for k, v in config["id2label"].items()}
    return {str(k): int(v) for k, v in mapping.items()}


def label_ids(artifact: Artifact, labels: Sequence[Any], num_labels: int) -> np.ndarray:
    """Labels as class indices: ints as they are, strings through the model's label2id."""
    mapping: dict[str, int] | None = None
    ids = []
    for label in labels:
        if isinstance(label, (bool, np.bool_)):
            raise BadInput(f"label {label!r} is a boolean; give class indices or the model's label names")
        if isinstance(label, (int, np.integer)):
            ids.append(int(label))
            continue
        if mapping is None:
            mapping = label_map(artifact)
        key = str(label)
        if key not in mapping:
            known = ", ".join(sorted(mapping)) or "none in its config"
            raise BadInput(f"label {label!r} is not one of the model's labels ({known}); "
                           "give class indices or names from config.label2id")
        ids.append(mapping[key])
    out = np.asarray(ids, dtype=np.int64)
    bad = out[(out < 0) | (out >= num_labels)]
    if bad.size:
        raise BadInput(f"label index {int(bad[0])} is out of range for a model with {num_labels} labels")
    return out


def accuracy(artifact: Artifact, texts: Sequence[str], labels: Sequence[Any], *, batch_size: int = 32,
             session: Session | None = None, predictions: np.ndarray | None = None) -> float:
    """Share of ``texts`` whose predicted class equals the label (names mapped via label2id)."""
    if len(texts) != len(labels):
        raise BadInput(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
    scores = predictions if predictions is not None else logits(artifact, texts, batch_size=batch_size, session=session)
    target = label_ids(artifact, labels, scores.shape[1])
    return float((scores.argmax(axis=1) == target).mean())


def logits_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> dict[str, float]:
    """Share of texts where both predict the same class, and the mean cosine of their logits."""
    cos = row_cosines(reference_logits, candidate_logits)
    agree = reference_logits.argmax(axis=1) == candidate_logits.argmax(axis=1)
    return {"agreement": float(agree.mean()), "logits_cosine": float(cos.mean())}


def evaluate(artifact: Artifact, reference: Artifact | None, texts: Sequence[str], labels: Sequence[Any] | None = None,
             *, k: int = 10, reference_embeddings: np.ndarray | None = None,
             candidate_outputs: np.ndarray | None = None, batch_size: int = 32) -> dict[str, float]:
    """Quality of ``artifact`` against ``reference`` (the run's source model) on ``texts``.

    Encoders: ``cosine``, ``cosine_min``, ``recall@k``. Classifiers: ``agreement`` and
    ``logits_cosine`` with the reference, plus ``accuracy`` when labels are given.
    ``reference_embeddings`` are the reference's outputs on ``texts`` (embeddings, or logits for
    classifiers) computed once beforehand; then ``reference`` is not run (and may be None).
    ``candidate_outputs`` likewise spares running ``artifact`` when its outputs are known.
    """
    texts = list(texts)
    if reference is None and reference_embeddings is None:
        raise BadInput("evaluate needs a reference model or its precomputed outputs (reference_embeddings)")
    if reference is not None and reference.task != artifact.task:
        raise BadInput(f"cannot compare a {artifact.task} model with a {reference.task} reference")
    if artifact.task == "feature-extraction":
        cand = candidate_outputs if candidate_outputs is not None else embed(artifact, texts, batch_size=batch_size)
        ref = reference_embeddings if reference_embeddings is not None else embed(reference, texts, batch_size=batch_size)
        _check_rows(ref, texts)
        metrics = fidelity(ref, cand, k)
        if labels is not None:
            log.info("labels are ignored for a feature-extraction model")
    elif artifact.task == "sequence-classification":
        cand = candidate_outputs if candidate_outputs is not None else logits(artifact, texts, batch_size=batch_size)
        ref = reference_embeddings if reference_embeddings is not None else logits(reference, texts, batch_size=batch_size)
        _check_rows(ref, texts)
        metrics = logits_agreement(ref, cand)
        if labels is not None:
            metrics["accuracy"] = accuracy(artifact, texts, labels, predictions=cand)
    elif artifact.task == "text-generation":
        metrics = decoder_fidelity(artifact, reference, reference_embeddings, is_reference=candidate_outputs is not None
                                   and candidate_outputs is reference_embeddings)
        if labels is not None:
            log.info("labels are ignored for a text-generation model")
    else:
        raise BadInput(f"evaluate measures feature-extraction, sequence-classification and text-generation models, "
                       f"not {artifact.task}")
    log.info("%s: %s", artifact.name, ", ".join(f"{k_}={v:.4f}" for k_, v in metrics.items()))
    return metrics


def decoder_fidelity(artifact: Artifact, reference: Artifact | None, prepared=None, *,
                     is_reference: bool = False) -> dict[str, float]:
    """A decoder's KL divergence, top-1 agreement and perplexity against the source on held-out
    corpus text (:mod:`edgesmith.lm_quality`; the evaluation rows of a recipe are sentence-length,
    so decoders score passages of their own that no calibration uses). ``prepared`` is the
    source's :class:`~edgesmith.lm_quality.Reference` from :func:`reference_outputs`."""
    from edgesmith.lm_quality import Reference, heldout_batches, logits_fn

    if prepared is None:
        if reference is None:
            raise BadInput("decoder evaluation needs the source model")
        prepared = Reference.build(logits_fn(reference), heldout_batches(reference.tokenizer or artifact.tokenizer))
    if is_reference:  # the source against itself: by definition, without running it again
        ppl = float(np.exp(prepared.nll))
        return {"kld": 0.0, "top1": 1.0, "perplexity": ppl, "perplexity_reference": ppl}
    result = prepared.compare(logits_fn(artifact))
    return {k: float(v) for k, v in result.items() if k != "tokens"}


def reference_outputs(artifact: Artifact, texts: Sequence[str], *, batch_size: int = 32):
    """What :func:`evaluate` compares against: pooled embeddings for encoders, logits for
    classifiers, the source's logits on held-out passages for decoders."""
    if artifact.task == "text-generation":
        from edgesmith.lm_quality import Reference, heldout_batches, logits_fn

        return Reference.build(logits_fn(artifact), heldout_batches(artifact.tokenizer))
    if artifact.task == "sequence-classification":
        return logits(artifact, texts, batch_size=batch_size)
    if artifact.task == "feature-extraction":
        return embed(artifact, texts, batch_size=batch_size)
    raise BadInput(f"evaluate measures feature-extraction and sequence-classification models, not {artifact.task}")


def _check_rows(reference: np.ndarray, texts: Sequence[str]) -> None:
    if reference.shape[0] != len(texts):
        raise BadInput(f"reference outputs have {reference.shape[0]} rows for {len(texts)} texts; "
                       "compute them on the same texts")


# ---------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------


def is_relative_metric(name: str) -> bool:
    return name in RELATIVE_METRICS or bool(_RECALL.match(name))


def is_task_metric(name: str) -> bool:
    return name.startswith(TASK_PREFIX) and len(name) > len(TASK_PREFIX)


def is_known_metric(name: str) -> bool:
    return is_relative_metric(name) or name in ABSOLUTE_METRICS or name in LOWER_IS_BETTER or is_task_metric(name)


def known_metrics() -> list[str]:
    return [*RELATIVE_METRICS, *ABSOLUTE_METRICS, *LOWER_IS_BETTER, "task.<name> (decoders: task accuracy)"]


def check_gates(metrics: dict[str, float], reference_metrics: dict[str, float],
                gates: dict[str, float]) -> list[dict[str, Any]]:
    """Failed gates. A gate ``{metric: max_drop}`` fails when reference - value > max_drop.

    The reference of cosine, recall, agreement and top1 is 1.0 (the source against itself); that
    of accuracy is the source's own value in ``reference_metrics``. For kld and perplexity (lower
    is better) the gate is the largest allowed rise: value - reference > max_drop fails, with 0 as
    kld's reference and the source's own perplexity as perplexity's.
    """
    failures = []
    for name, max_drop in gates.items():
        if not is_known_metric(name):
            raise BadInput(f"unknown metric '{name}' in a gate; known metrics: {', '.join(known_metrics())} "
                           "(recall@k with the evaluation's k, e.g. recall@10)")
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop):
            raise BadInput(f"gate '{name}': max_drop must be a number (got {max_drop!r})")
        if name not in metrics:
            measured = ", ".join(metrics) or "nothing"
            hint = {"accuracy": " (accuracy needs labels)"}.get(name, " (task gates need a decoder)"
                                                                 if is_task_metric(name) else "")
            raise BadInput(f"gate on '{name}', but this evaluation measured only: {measured}{hint}")
        if name == "kld":
            reference = 0.0
        elif is_relative_metric(name):
            reference = 1.0
        elif name in reference_metrics:
            reference = float(reference_metrics[name])
        else:
            raise BadInput(f"gate on '{name}' needs the source model's own {name}, which was not measured")
        value = float(metrics[name])
        drop = value - reference if name in LOWER_IS_BETTER else reference - value
        if drop > max_drop + 1e-9:
            failures.append({"metric": name, "value": value, "reference": reference,
                             "drop": drop, "max_drop": float(max_drop)})
    return failures
