"""Shared fixtures: tiny Hugging Face models saved as folders, and an isolated step cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from edgesmith.artifacts import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


def _tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128)
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    """A tiny random BertModel saved with save_pretrained, with the MiniLM tokenizer beside it."""
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    model = BertModel(_tiny_bert_config()).eval()
    model.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny-classifier")
    model = BertForSequenceClassification(_tiny_bert_config(num_labels=3)).eval()
    model.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Each test gets its own step cache, so no test sees another's cached steps."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGESMITH_CACHE", str(folder))
    return folder


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _autocast_importable() -> bool:
    from edgesmith.tensorrt.precision import autocast_available

    return autocast_available()


def _llamacpp_importable() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _optimum_venv_ready() -> bool:
    """bench/.venv-optimum built (bench/optimum_env.py writes its stamp last), where the bench finds it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("optimum_env", Path(__file__).resolve().parents[1] / "bench"
                                                  / "optimum_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STAMP.exists() and module.python().exists()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests where no CUDA device is present, and tests marked `tensorrt` where
    TensorRT's Python package is missing, each with the reason."""
    cuda = torch.cuda.is_available()
    tensorrt = _tensorrt_importable()
    autocast = any("modelopt" in item.keywords for item in items) and _autocast_importable()
    llamacpp = not any("llamacpp" in item.keywords for item in items) or _llamacpp_importable()
    optimum = not any(item.get_closest_marker("optimum") for item in items) or _optimum_venv_ready()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        elif "tensorrt" in item.keywords and not tensorrt:
            item.add_marker(pytest.mark.skip(reason="tensorrt is not installed (NVIDIA's package index)"))
        elif "modelopt" in item.keywords and not autocast:
            item.add_marker(pytest.mark.skip(reason="NVIDIA Model Optimizer's AutoCast is not installed "
                                                    "(pip install 'edgesmith[modelopt]')"))
        elif "llamacpp" in item.keywords and not llamacpp:
            item.add_marker(pytest.mark.skip(reason="llama-cpp-python is not importable (pip install "
                                                    "'edgesmith[llamacpp]')"))
        elif item.get_closest_marker("optimum") and not optimum:
            item.add_marker(pytest.mark.skip(reason="bench/.venv-optimum is not built (python bench/optimum_env.py, "
                                                    "~15 min, or make bench)"))
