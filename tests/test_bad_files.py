"""Every kind of file edgesmith reads, broken every way a user meets, through the command that reads it.

The suite is a table: one row per file kind (how to make a valid one, the command that reads it and
the kind's own edits) times the breakages in ``BREAKAGES`` (empty, truncated at a third, random
bytes, valid syntax with wrong types, missing required keys, a newer schema, a path escaping the
folder, a folder where the file should be, a symbolic-link loop). Each case must end with exit 2 (3
where a quality check fails), exactly one line on stderr that names the broken file, no traceback,
and nothing half-written: no output folder, nothing new in the working folder, no new cache entry,
no temp folder left behind (tempfile's folder is a per-test one, so a leak shows), the input's
folder unchanged. A new file kind is one row; a breakage that cannot apply to a kind says why in the
row's ``skip``. A second, smaller table gives a file where a folder is needed (the reverse).

Each row's valid setup is also run once (``test_the_valid_file_works``; the model-folder rows' is the
export and prune in ``sources``), so that every broken case differs from a working one by the
breakage alone. One-pass verbs run with ``--json``, where stderr carries nothing but errors.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from edgesmith.cli.app import main

BREAKAGES = ("empty", "truncated", "random", "wrong-types", "missing-keys", "newer-schema", "escape", "directory",
             "symlink-loop")
#: breakages every kind gets without an edit of its own
GENERIC = ("empty", "truncated", "random", "directory", "symlink-loop")


# ---------------------------------------------------------------------------------------------
# The valid files every row starts from (built once per session: tiny models, seconds)
# ---------------------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_bert_dir, minilm_tokenizer) -> dict[str, Path]:
    """The valid originals: a tiny BERT folder, its ONNX export, an early-exit model, a profile,
    a GGUF, a recipe, a target and data files."""
    root = tmp_path_factory.mktemp("bad-files-sources")
    cache = root / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGESMITH_CACHE", str(cache))
    try:
        found = {"hf": tiny_bert_dir}
        capture = _Capture()
        code, _, err = capture.cli("export", tiny_bert_dir, "-o", root / "onnx", "--json")
        assert code == 0, err  # also the valid case of the model-folder rows
        found["onnx"] = root / "onnx"
        code, _, err = capture.cli("prune", tiny_bert_dir, "--heads", "0.5", "--no-latency-check", "-o", root / "pruned",
                                   "--json")
        assert code == 0, err
        found["pruned"] = root / "pruned"  # an edgesmith torch folder whose shapes only its structure says
        code, _, err = capture.cli("profile", root / "onnx", "--runtime", "onnxruntime", "--batch", "1", "--seq", "8",
                                   "--iterations", "4", "--warmup", "1", "-o", root / "profile.json")
        assert code == 0, err
        found["profile"] = root / "profile.json"
        found["early-exit"] = _early_exit_folder(root / "early-exit", minilm_tokenizer)
        from test_gguf_source import write_tiny_gguf

        found["gguf"] = root / "tiny.gguf"
        write_tiny_gguf(found["gguf"])
    finally:
        mp.undo()
    return found


class _Capture:
    """The CLI outside a test function (capsys is function-scoped): output goes to pytest's capture."""

    def cli(self, *args) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            return exc.code, "", ""
        return 0, "", ""


def _early_exit_folder(folder: Path, tokenizer) -> Path:
    from transformers import BertConfig, BertModel

    from edgesmith.artifacts import TorchModel
    from edgesmith.compress import Context, early_exit
    from edgesmith.data import builtin_corpus

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    model = TorchModel(task="feature-extraction", name="tiny-ee", module=BertModel(cfg).eval(), tokenizer=tokenizer)
    out = early_exit(model, Context(texts=builtin_corpus(limit=160), progress=False), steps=4, eval_every=4,
                     validation=60, exits=[1], budget="cosine=0.5")
    out.save(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Edits: valid syntax with wrong types, missing keys, a newer schema, a path escaping the folder
# ---------------------------------------------------------------------------------------------

Edit = Callable[[bytes, Path], bytes]


def json_edit(change: Callable[[dict], None]) -> Edit:
    def edit(data: bytes, path: Path) -> bytes:
        value = json.loads(data)
        change(value)
        return json.dumps(value, indent=2).encode()
    return edit


def yaml_edit(change: Callable[[dict], None]) -> Edit:
    def edit(data: bytes, path: Path) -> bytes:
        value = yaml.safe_load(data)
        change(value)
        return yaml.safe_dump(value, sort_keys=False).encode()
    return edit


def _set(**values) -> Callable[[dict], None]:
    return lambda d: d.update(values)


def _drop(*keys: str) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        for key in keys:
            d.pop(key, None)
    return change


def onnx_edit(change: Callable) -> Edit:
    def edit(data: bytes, path: Path) -> bytes:
        import onnx

        model = onnx.load_from_string(data)
        change(model, path)
        return model.SerializeToString()
    return edit


def _onnx_input_of_wrong_type(model, path) -> None:
    import onnx

    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.STRING


def _onnx_without_a_weight(model, path) -> None:
    del model.graph.initializer[0]


def _onnx_newer_ir(model, path) -> None:
    model.ir_version = 99


def _onnx_weight_outside(model, path) -> None:
    """The largest weight moved to ``../outside.bin`` (a real file, so only the escape is wrong)."""
    from onnx.external_data_helper import set_external_data

    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (path.parent.parent / "outside.bin").write_bytes(tensor.raw_data)
    set_external_data(tensor, location="../outside.bin", offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")


def _safetensors_header(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def _safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _safetensors_wrong_dtype(data: bytes, path: Path) -> bytes:
    header, body = _safetensors_header(data)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Q77"
    return _safetensors(header, body)


def _safetensors_without_a_weight(data: bytes, path: Path) -> bytes:
    from safetensors.torch import load, save

    tensors = load(data)
    tensors.pop("embeddings.word_embeddings.weight")
    return save(tensors, metadata={"format": "pt"})


def _gguf_edit(key: bytes, *, type_code: int | None = None, rename: bytes | None = None) -> Edit:
    def edit(data: bytes, path: Path) -> bytes:
        at = data.index(key)
        out = bytearray(data)
        if rename is not None:
            out[at:at + len(key)] = rename
        if type_code is not None:  # the value's type follows the key; 6 is FLOAT32, same width as UINT32
            out[at + len(key):at + len(key) + 4] = struct.pack("<I", type_code)
        return bytes(out)
    return edit


def _gguf_newer_version(data: bytes, path: Path) -> bytes:
    return data[:4] + struct.pack("<I", 99) + data[8:]


def _policy_segment_outside(data: bytes, path: Path) -> bytes:
    policy = json.loads(data)
    first = policy["segments"][0]["file"]
    shutil.copy2(path.parent / first, path.parent.parent / "outside.onnx")
    policy["segments"][0]["file"] = "../outside.onnx"
    return json.dumps(policy, indent=2).encode()


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A file edgesmith reads: ``setup`` copies a valid set into the case folder and returns the file
    to break; ``argv`` is the command that reads it (given the case folder and the output path)."""

    name: str
    setup: Callable[[dict[str, Path], Path], Path]
    argv: Callable[[Path, Path], list]
    edits: dict[str, Edit] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)  # breakage -> why it cannot apply
    code: int = 2

    def breakages(self) -> list[str]:
        return [b for b in BREAKAGES if (b in GENERIC or b in self.edits) and b not in self.skip]


def _copy(key: str, name: str | None = None) -> Callable[[dict[str, Path], Path], Path]:
    """Copy source ``key`` into the case folder; the file to break is ``name`` inside it (or the copy)."""
    def setup(src: dict[str, Path], case: Path) -> Path:
        origin = src[key]
        if origin.is_dir():
            shutil.copytree(origin, case / key)
            return case / key / name if name else case / key
        shutil.copy2(origin, case / origin.name)
        return case / origin.name
    return setup


def _write(filename: str, text: Callable[[dict[str, Path]], str]) -> Callable[[dict[str, Path], Path], Path]:
    def setup(src: dict[str, Path], case: Path) -> Path:
        folder = case / "files"
        folder.mkdir()
        (folder / filename).write_text(text(src))
        return folder / filename
    return setup


TEXTS = [f"sentence number {i} about a small model that runs on a phone" for i in range(24)]


def _jsonl(src) -> str:
    return "".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS))


def _csv(src) -> str:
    return "text,label\n" + "".join(f"\"{t}\",{i % 2}\n" for i, t in enumerate(TEXTS))


def _txt(src) -> str:
    return "".join(t + "\n" for t in TEXTS)


def _recipe(src) -> str:
    # the step comes first, in flow style: a file cut at a third ends inside it (a YAML cut at a line end
    # is a valid, shorter document, which no reader can tell from the real one)
    return (f"steps: [{{prune: {{heads: 0.5, check_latency: false, round_to: 1}}}}]\n"
            f"model: {src['hf']}\nevaluate: {{enabled: false}}\nprofile: null\n")


def _target(src) -> str:
    return ("precisions: [fp32, int8]\nshapes: [{batch: 1, seq: 128}, {batch: 8, seq: 128}]\n"
            "name: my-box\nruntime: onnxruntime\nprovider: cpu\nthreads: 4\nhost: local\n")


def _parquet(src: dict[str, Path], case: Path) -> Path:
    """A parquet data file (pyarrow, as users of .parquet have it: the `parquet` extra, in `make setup`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = case / "files"
    folder.mkdir()
    pq.write_table(pa.table({"text": TEXTS, "label": [i % 2 for i in range(len(TEXTS))]}), folder / "data.parquet")
    return folder / "data.parquet"


def _parquet_edit(columns: Callable[[dict], dict]) -> Edit:
    def edit(data: bytes, path: Path) -> bytes:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data)).to_pydict()
        out = io.BytesIO()
        pq.write_table(pa.table(columns(table)), out)
        return out.getvalue()
    return edit


def _sweep(src) -> str:
    return (f"steps: [{{export: {{}}}}, {{quantize: {{min_cosine: 0.5}}}}]\n"
            f"model: {src['hf']}\nevaluate: {{enabled: false}}\nprofile: null\n"
            "search: {parameters: {steps.quantize.per_channel: [true, false]}, objectives: {size: min}, "
            "budget: {trials: 1}}\n")


def _prune_with(data: Path, out: Path) -> list:
    return ["prune", "{hf}", "--heads", "0.5", "--importance", "taylor", "--data", data, "--no-latency-check",
            "-o", out, "--json"]


NOT_TEXT_ROWS = "a text file cut short is a valid file with fewer rows"

KINDS = [
    Kind("config.json", _copy("hf", "config.json"), lambda case, out: ["export", case / "hf", "-o", out, "--json"],
         edits={"wrong-types": json_edit(_set(hidden_size="thirty-two", num_hidden_layers=[2])),
                "missing-keys": json_edit(_drop("model_type", "architectures")),
                "newer-schema": json_edit(_set(model_type="bert-of-a-newer-transformers"))},
         skip={"escape": "config.json names no files"}),
    Kind("model.safetensors", _copy("hf", "model.safetensors"),
         lambda case, out: ["export", case / "hf", "-o", out, "--json"],
         edits={"wrong-types": _safetensors_wrong_dtype, "missing-keys": _safetensors_without_a_weight},
         skip={"escape": "the header holds offsets, not paths", "newer-schema": "the format has no version"}),
    Kind("pruned model.safetensors", _copy("pruned", "model.safetensors"),
         lambda case, out: ["export", case / "pruned", "-o", out, "--json"],
         edits={"wrong-types": _safetensors_wrong_dtype, "missing-keys": _safetensors_without_a_weight},
         skip={"escape": "the header holds offsets, not paths", "newer-schema": "the format has no version"}),
    Kind("tokenizer.json", _copy("hf", "tokenizer.json"),
         lambda case, out: ["export", case / "hf", "-o", out, "--json"],
         edits={"wrong-types": json_edit(_set(model=5)), "missing-keys": json_edit(_drop("model"))},
         skip={"escape": "names no files", "newer-schema": "tokenizers reads every version it knows"}),
    Kind("model.onnx", _copy("onnx", "model.onnx"), lambda case, out: ["quantize", case / "onnx", "-o", out, "--json"],
         edits={"wrong-types": onnx_edit(_onnx_input_of_wrong_type), "missing-keys": onnx_edit(_onnx_without_a_weight),
                "newer-schema": onnx_edit(_onnx_newer_ir), "escape": onnx_edit(_onnx_weight_outside)}),
    Kind("edgesmith.json", _copy("onnx", "edgesmith.json"),
         lambda case, out: ["quantize", case / "onnx", "-o", out, "--json"],
         edits={"wrong-types": json_edit(_set(schema="one", kind=["onnx"], lineage="none")),
                "missing-keys": json_edit(_drop("kind")), "newer-schema": json_edit(_set(schema=99))},
         skip={"escape": "names no files"}),
    Kind("policy.json", _copy("early-exit", "policy.json"),
         lambda case, out: ["profile", case / "early-exit", "--batch", "1", "--seq", "8", "--iterations", "2",
                            "--warmup", "0", "-o", out],
         edits={"wrong-types": json_edit(_set(threshold="high", exit_layers="all")),
                "missing-keys": json_edit(_drop("segments", "name")),
                "newer-schema": json_edit(_set(name="a-policy-of-a-newer-edgesmith")),
                "escape": _policy_segment_outside}),
    Kind("profile JSON", _copy("profile"), lambda case, out: ["compare", "{profile}", case / "profile.json", "--json"],
         edits={"wrong-types": json_edit(_set(latencies_ms="fast")), "missing-keys": json_edit(_drop("runtime")),
                "newer-schema": json_edit(_set(schema_version=99))},
         skip={"escape": "names no files"}),
    Kind("recipe YAML", _write("recipe.yaml", _recipe), lambda case, out: ["run", case / "files" / "recipe.yaml"],
         edits={"wrong-types": yaml_edit(_set(steps="prune", evaluate=[1])),
                # a recipe has no version: a newer edgesmith's recipe is one with a key this one does not know
                "newer-schema": yaml_edit(_set(retries=3))},
         skip={"missing-keys": "every recipe key has a default", "escape": "a recipe's paths are the user's own"}),
    Kind("target YAML", _write("my-box.yaml", _target),
         lambda case, out: ["targets", "--targets-dir", case / "files", "--json"],
         edits={"wrong-types": yaml_edit(_set(threads="many", shapes="big")),
                "newer-schema": yaml_edit(_set(gpu_clock_mhz=1500))},
         skip={"missing-keys": "every target key has a default", "escape": "names no files"}),
    Kind("data .jsonl", _write("data.jsonl", _jsonl), lambda case, out: _prune_with(case / "files" / "data.jsonl", out),
         edits={"wrong-types": lambda data, path: b'{"text": 5}\n' * 24,
                "missing-keys": lambda data, path: b'{"body": "a sentence"}\n' * 24},
         skip={"newer-schema": "data files have no schema", "escape": "names no files"}),
    Kind("data .csv", _write("data.csv", _csv), lambda case, out: _prune_with(case / "files" / "data.csv", out),
         edits={"missing-keys": lambda data, path: data.replace(b"text,label", b"body,label", 1)},
         skip={"truncated": NOT_TEXT_ROWS, "wrong-types": "CSV values are all text",
               "newer-schema": "data files have no schema", "escape": "names no files"}),
    Kind("data .txt", _write("data.txt", _txt), lambda case, out: _prune_with(case / "files" / "data.txt", out),
         skip={"truncated": NOT_TEXT_ROWS, "wrong-types": "lines of text have no types",
               "missing-keys": "lines of text have no keys", "newer-schema": "data files have no schema",
               "escape": "names no files"}),
    Kind("data .parquet", _parquet, lambda case, out: _prune_with(case / "files" / "data.parquet", out),
         edits={"wrong-types": _parquet_edit(lambda t: {**t, "text": list(range(len(t["text"])))}),
                "missing-keys": _parquet_edit(lambda t: {"body": t["text"], "label": t["label"]})},
         skip={"newer-schema": "data files have no schema", "escape": "names no files"}),
    Kind("sweep YAML", _write("sweep.yaml", _sweep),
         lambda case, out: ["sweep", case / "files" / "sweep.yaml", "--out", out, "--json"],
         edits={"wrong-types": yaml_edit(lambda d: d["search"].update(parameters="all", budget=[1])),
                "missing-keys": yaml_edit(lambda d: d["search"].pop("objectives")),
                # a sweep has no version: a newer edgesmith's is one with a search key this one does not know
                "newer-schema": yaml_edit(lambda d: d["search"].update(pruner="hyperband"))},
         skip={"escape": "a sweep's paths are the user's own"}),
    Kind("GGUF", _copy("gguf"), lambda case, out: ["inspect", case / "tiny.gguf", "--json"],
         edits={"wrong-types": _gguf_edit(b"llama.block_count", type_code=6),
                "missing-keys": _gguf_edit(b"llama.block_count", rename=b"llama.block_xount"),
                "newer-schema": _gguf_newer_version},
         skip={"escape": "a GGUF holds its tensors inside"}),
]

CASES = [pytest.param(kind, breakage, id=f"{kind.name}-{breakage}") for kind in KINDS for breakage in kind.breakages()]


def _break(path: Path, breakage: str, kind: Kind) -> None:
    data = path.read_bytes()
    if breakage == "empty":
        path.write_bytes(b"")
    elif breakage == "truncated":
        path.write_bytes(data[:len(data) // 3])
    elif breakage == "random":
        path.write_bytes(np.random.default_rng(18).bytes(max(256, min(len(data), 4096))))
    elif breakage == "directory":
        path.unlink()
        path.mkdir()
    elif breakage == "symlink-loop":  # the file is a link to a link back to it
        path.unlink()
        path.symlink_to(path.with_name(path.name + ".link"))
        path.with_name(path.name + ".link").symlink_to(path)
    else:
        path.write_bytes(kind.edits[breakage](data, path))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def _cache_entries(cache: Path) -> set[str]:
    """Files and entries (``steps/<key>``, ``gguf/<key>``, temp folders) of the cache; not its empty
    top folders, and not ``one-pass/`` (the record of a failed one-pass call is kept there)."""
    return {str(p.relative_to(cache)) for p in cache.rglob("*")
            if not p.is_relative_to(cache / "one-pass") and (p.is_file() or p.parent != cache)}


def _fill(argv: list, src: dict[str, Path]) -> list[str]:
    return [str(a).format(**{k: str(v) for k, v in src.items()}) if isinstance(a, str) else str(a) for a in argv]


@pytest.fixture()
def workplace(tmp_path, monkeypatch):
    """An empty working folder, a fresh cache and a private temp folder, each checked after the case."""
    cwd, cache, tmp = tmp_path / "cwd", tmp_path / "cache", tmp_path / "tmp"
    for folder in (cwd, cache, tmp):
        folder.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("EDGESMITH_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp_path


def test_the_table_covers_every_breakage_somewhere():
    covered = {b for kind in KINDS for b in kind.breakages()}
    assert covered == set(BREAKAGES)
    for kind in KINDS:
        assert set(kind.edits) | set(kind.skip) | set(GENERIC) >= set(BREAKAGES), kind.name
        assert not set(kind.edits) & set(kind.skip), kind.name


@pytest.mark.parametrize("kind, breakage", CASES)
def test_a_broken_file_is_one_line_and_leaves_nothing(kind, breakage, sources, workplace, capsys):
    case = workplace / "case"
    case.mkdir()
    target = kind.setup(sources, case)
    _break(target, breakage, kind)
    cache, cwd, tmp = workplace / "cache", workplace / "cwd", workplace / "tmp"
    out = cwd / "out"
    argv = _fill(kind.argv(case, out), sources)
    before_case, before_cache = _files(case), _cache_entries(cache)

    code, _, err = _cli(capsys, *argv)

    lines = [line for line in err.splitlines() if line.strip()]
    print(f"{kind.name} {breakage}: {err.strip()}")  # the message, for `pytest -rP`
    assert code == kind.code, err
    assert len(lines) == 1, err
    assert re.search(re.escape(str(target)) + r"($|[:;,\s)'])", lines[0]), lines[0]  # the file, not a neighbour
    assert "Traceback" not in err and "internal error" not in err
    assert list(cwd.iterdir()) == [], "the working folder gained files"
    assert not out.exists()
    assert _cache_entries(cache) == before_cache, "a cache entry was written"
    assert list(tmp.iterdir()) == [], "a temp folder was left"
    assert _files(case) == before_case, "the input's folder changed"


@pytest.mark.parametrize("kind", KINDS[4:], ids=[k.name for k in KINDS[4:]])
def test_the_valid_file_works(kind, sources, workplace, capsys):
    """The unbroken setup of each row succeeds (the model-folder rows' is the export in ``sources``)."""
    case = workplace / "case"
    case.mkdir()
    kind.setup(sources, case)
    out = workplace / "cwd" / "out"
    code, _, err = _cli(capsys, *_fill(kind.argv(case, out), sources))
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# The reverse: a file where edgesmith needs a folder
# ---------------------------------------------------------------------------------------------

FOLDER_ARGUMENTS = {
    "model folder": ["inspect", "{file}"],
    "--targets-dir": ["targets", "--targets-dir", "{file}", "--json"],
    "--output": ["export", "{hf}", "-o", "{file}", "--json"],
    "--cache-dir": ["export", "{hf}", "--cache-dir", "{file}", "--json"],
    "--runs-dir": ["export", "{hf}", "--runs-dir", "{file}", "--json"],
    "profile --output's folder": ["profile", "{onnx}", "--batch", "1", "--seq", "8", "--iterations", "2", "--warmup",
                                  "0", "-o", "{file}/profile.json"],
}


@pytest.mark.parametrize("argv", FOLDER_ARGUMENTS.values(), ids=FOLDER_ARGUMENTS.keys())
def test_a_file_where_a_folder_is_needed_is_one_line(argv, sources, workplace, capsys):
    file = workplace / "case" / "a-file"
    file.parent.mkdir()
    file.write_text("not a folder\n")
    cache, cwd, tmp = workplace / "cache", workplace / "cwd", workplace / "tmp"
    code, _, err = _cli(capsys, *_fill(argv, {**sources, "file": file}))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and re.search(re.escape(str(file)) + r"($|[:;,\s)'])", lines[0]), err
    assert "Traceback" not in err
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == [] and _cache_entries(cache) == set()
    assert file.read_text() == "not a folder\n"


def test_no_permission_is_one_line_naming_the_path(tmp_path):
    from edgesmith.errors import file_system_error

    error = file_system_error(PermissionError(13, "Permission denied", str(tmp_path / "out")))
    assert str(error).startswith(f"{tmp_path / 'out'}: permission denied") and error.exit_code == 2
    assert file_system_error(OSError(5, "Input/output error", "x")) is None
    assert file_system_error(ValueError("no")) is None
