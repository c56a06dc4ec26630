"""edgesmith: make trained transformers small and fast enough to deploy, and prove it by measurement.

    import edgesmith as es
    m = es.load("minilm")
    m = es.compress.prune(m, heads=0.25, ffn=0.25)
    o = es.export.to_onnx(m)
    q = es.compress.quantize(o)
    p = es.profile(q, runtime="onnxruntime")

    llm = es.load("smollm2")                     # SmolLM2-135M-Instruct from its packaged Q4_1 GGUF
    print(es.generate(llm, "What is the capital of France?").text)
    report = es.evaluate(llm, tasks=["mmlu-mini", "wordnet-mc"])   # task accuracy (edgesmith[tasks])
"""

from __future__ import annotations

from edgesmith import compress, export
from edgesmith.artifacts import Artifact, OnnxModel, TorchModel, load
from edgesmith.errors import BadInput, EdgesmithError, GateFailed, ValidationFailed
from edgesmith.version import __version__

__all__ = [
    "Artifact", "BadInput", "EdgesmithError", "GateFailed", "OnnxModel", "Recipe", "TorchModel",
    "ValidationFailed", "compare", "compress", "evaluate", "export", "generate", "load", "profile", "run",
    "speculate",
]


def __getattr__(name: str):
    # heavier parts load on first use, so `import edgesmith` stays quick
    if name == "Recipe":
        from edgesmith.recipe import Recipe

        return Recipe
    if name == "run":
        from edgesmith.pipeline import run

        return run
    if name == "profile":
        from edgesmith.profiling import profile

        return profile
    if name == "compare":
        from edgesmith.profiling import compare

        return compare
    if name == "generate":
        from edgesmith.runtimes.generation import generate_text

        return generate_text
    if name == "speculate":
        from edgesmith.profiling.speculative import profile_speculative

        return profile_speculative
    if name == "evaluate":  # fidelity against the source; with tasks=[...], decoders' task accuracy too
        from edgesmith.tasks.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'edgesmith' has no attribute {name!r}")
