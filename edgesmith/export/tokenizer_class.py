"""The tokenizer class an exported folder's ``tokenizer_config.json`` names, readable by
transformers 4 as well as 5.

transformers 5 saves a tokenizer that lives in ``tokenizer.json`` alone (SmolLM2's, read from its
GGUF, for one) as ``"tokenizer_class": "TokenizersBackend"``, a class transformers 4 does not have:
``AutoTokenizer`` there fails with "Tokenizer class TokenizersBackend does not exist", and Optimum's
``ORTModelForCausalLM`` runs on transformers < 4.58. transformers 4's name for that tokenizer is
``PreTrainedTokenizerFast``, which transformers 5 still loads (as ``TokenizersBackend``). On SmolLM2
the ids, special tokens and chat template are the same either way in transformers 4.57.6 and 5.25,
and ORT GenAI 0.18's tokenizer gives the same ids for both names.

Layer L4 (export): imports edgesmith.storage only.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgesmith.storage import write_json_atomic

TOKENIZER_CONFIG = "tokenizer_config.json"
#: transformers-5-only class names -> the class transformers 4 loads the same tokenizer.json with
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_class(folder: Path) -> str | None:
    """Rewrite ``folder/tokenizer_config.json``'s ``tokenizer_class`` to a name transformers 4 and 5
    both load, when it is a transformers-5-only name and ``tokenizer.json`` is there. Returns the
    class now named (None when there is no tokenizer config)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.exists():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    name = config.get("tokenizer_class")
    portable = PORTABLE_CLASSES.get(name)
    if portable is not None and (path.parent / "tokenizer.json").exists():
        config["tokenizer_class"] = portable
        write_json_atomic(path, config)
        return portable
    return name
