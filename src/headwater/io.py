"""Reading the command line's inputs: data files, query files and local Hugging Face models.

Everything a user can get wrong here raises ``InputError`` with one line that names the file,
what was expected, what was found and how to fix it; the CLI prints that line and exits 2.
Nothing here downloads: models and tokenizers load with ``local_files_only=True``.

Training data formats (picked by file name)::

    *.jsonl / *.json   one JSON object per line: {"text": ...}, {"prompt": ..., "completion": ...}
                       or {"input_ids": [...]}; a .json file may also hold one list of them
    *.parquet          a table with a "text" (or "prompt" + "completion") column
    *.arrow            an Arrow file (e.g. written by datasets), same columns
    a directory        a dataset written by datasets' save_to_disk
    anything else      plain text: one document per blank-line-separated block
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = [
    "InputError",
    "Records",
    "where",
    "RESERVED_QUERY_FIELDS",
    "check_relevant",
    "TASK_KINDS",
    "query_example",
    "read_documents",
    "read_queries",
    "load_model",
    "load_tokenizer",
    "file_sha256",
    "document_text",
    "context_length",
    "tokenizer_sha256",
]

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
# What a model does, as the command line's --task names it (each maps to a HF auto class and a Task).
TASK_KINDS = ("causal-lm", "seq-cls", "seq2seq")
# Fields of a results.jsonl row that headwater writes; a query may not bring its own.
RESERVED_QUERY_FIELDS = frozenset(
    {"query", "top", "bottom", "stats", "recall", "recall_k", "per_layer_top", "per_layer_bottom"}
)
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class InputError(ValueError):
    """A file, directory or model given on the command line cannot be used as it is."""


class Records(list):
    """Examples read from a file, each with where it came from (``where(i)``: "train.jsonl, line 7")."""

    def __init__(self, items: list, locations: list[str]):
        super().__init__(items)
        self.locations = locations

    def where(self, i: int) -> str:
        return self.locations[i] if 0 <= i < len(self.locations) else f"example {i}"


def where(data: Any, path: str | Path, i: int) -> str:
    """The file location of example ``i`` of data read by ``read_documents`` / ``read_queries``."""
    if isinstance(data, Records):
        return data.where(i)
    return f"{path}, row {i}"  # a table: rows count from 0, as in datasets


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


def _clean_record(obj: Any, where: str) -> dict:
    """Validate one training example and keep only the fields the task reads.

    Dropping other fields (ids, metadata) keeps the data fingerprint about content only.
    """
    if isinstance(obj, str):
        obj = {"text": obj}
    if not isinstance(obj, dict):
        raise InputError(f'{where}: expected a JSON object such as {{"text": "..."}}, got {type(obj).__name__}')
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"{where}: 'input_ids' must be a list of integers")
        if len(ids) < 2:
            raise InputError(f"{where}: 'input_ids' has {len(ids)} token(s); at least 2 are needed")
        return {k: obj[k] for k in ("input_ids", "labels", "attention_mask") if k in obj}
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise InputError(
                    f"{where}: a prompt/completion example needs both as strings; '{key}' is {_describe(obj.get(key))}"
                )
        if not obj["completion"]:
            raise InputError(f"{where}: 'completion' is empty; only the completion is scored, so it needs text")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    if "text" not in obj:
        raise InputError(
            f"{where}: no 'text' field (found keys {sorted(obj)}); each example needs 'text', "
            "or 'prompt' and 'completion', or 'input_ids'"
        )
    if not isinstance(obj["text"], str):
        raise InputError(f"{where}: 'text' must be a string, got {_describe(obj['text'])}")
    if not obj["text"].strip():
        raise InputError(f"{where}: 'text' is empty; remove the example or give it text")
    return {"text": obj["text"]}


def _describe(x: Any) -> str:
    return "missing" if x is None else type(x).__name__


def _iter_json_records(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed object) per record: JSON Lines, or a single JSON list."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    if path.suffix == ".json" and raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from e
        return [(f"{path}, item {i}", obj) for i, obj in enumerate(items)]
    out = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}); each line must be one "
                'JSON object such as {"text": "..."}'
            ) from e
        out.append((f"{path}, line {n}", obj))
    return out


def _check_exists(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist; check the path")
    return path


def _read_table(path: Path) -> Any:
    """A parquet/arrow file or a save_to_disk directory as an in-memory ``datasets.Dataset``."""
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
            return ds
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return datasets.Dataset(pq.read_table(str(path)))
        try:  # datasets writes Arrow *streams*; pyarrow/feather write Arrow *files*
            return datasets.Dataset.from_file(str(path), in_memory=True)
        except Exception:
            import pyarrow.feather as feather

            return datasets.Dataset(feather.read_table(str(path)))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {path} as a dataset table: {_first_line(e)}") from e


def _clean_table(ds: Any, path: Path) -> Any:
    cols = set(ds.column_names)
    if "input_ids" in cols:
        keep = [c for c in ("input_ids", "labels", "attention_mask") if c in cols]
    elif {"prompt", "completion"} <= cols:
        keep = ["prompt", "completion"]
    elif "text" in cols:
        keep = ["text"]
    else:
        raise InputError(
            f"{path} has no 'text' column (columns: {sorted(cols)}); it needs 'text', or "
            "'prompt' and 'completion', or 'input_ids'"
        )
    ds = ds.select_columns(keep)
    for c in keep:
        col = ds.data.column(c)
        nulls = col.null_count
        if nulls:
            raise InputError(f"{path}: column '{c}' has {nulls} missing value(s); drop those rows")
        _check_column_type(path, c, col.type)
        _check_column_values(path, c, col)
    return ds


def _check_column_values(path: Path, name: str, col: Any) -> None:
    """Every value must decode: parquet does not check that string bytes are UTF-8 (nor do its
    readers), so a damaged file would otherwise fail mid-fit on the first bad row, naming nothing."""
    import pyarrow as pa

    try:
        col.validate(full=True)
    except pa.ArrowInvalid as e:
        raise InputError(
            f"{path}: column '{name}' holds invalid values ({_first_line(e)}): the file is damaged or not UTF-8; "
            "write it again"
        ) from e


def _check_column_type(path: Path, name: str, kind: Any) -> None:
    """Text columns must hold strings and id columns lists of integers; say which column does not."""
    import pyarrow as pa

    if name in ("text", "prompt", "completion"):
        ok = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        want = "strings"
    else:
        ok = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)
        want = "lists of integers"
    if not ok:
        raise InputError(f"{path}: column '{name}' holds {kind}, not {want}; convert the column or rename it")


def _clean_task_record(obj: Any, where: str, task: str) -> dict:
    """One example for a sequence-classification or seq2seq model (see ``TASK_KINDS``)."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if task == "seq-cls":
        label = obj.get("label", obj.get("labels"))
        if isinstance(label, bool) or not isinstance(label, int):
            raise InputError(f"{where}: a classification example needs an integer 'label' (found {_describe(label)})")
        if "input_ids" in obj:
            return {**_clean_record({"input_ids": obj["input_ids"]}, where), "label": label}
        for key in ("text", *(["text_pair"] if "text_pair" in obj else [])):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise InputError(f"{where}: a classification example needs a non-empty string '{key}'")
        return {k: obj[k] for k in ("text", "text_pair") if k in obj} | {"label": label}
    if "input_ids" in obj:
        if not isinstance(obj.get("labels"), list):
            raise InputError(f"{where}: a pre-tokenized seq2seq example needs 'labels' (the target ids)")
        return {
            "input_ids": _clean_record({"input_ids": obj["input_ids"]}, where)["input_ids"],
            "labels": obj["labels"],
        }
    src, tgt = (obj.get("source"), obj.get("target")) if "source" in obj else (obj.get("prompt"), obj.get("completion"))
    if not isinstance(src, str) or not isinstance(tgt, str) or not tgt:
        raise InputError(f"{where}: a seq2seq example needs strings 'source' and 'target' (or 'prompt', 'completion')")
    return {"source": src, "target": tgt}


def read_documents(path: str | Path, task: str = "causal-lm") -> Any:
    """Training documents from a file: a list of example dicts, or a ``datasets.Dataset``.

    Both support ``len`` and integer indexing, so training example j is row j of the file
    (blank lines in JSONL are skipped and do not count). ``task`` (one of ``TASK_KINDS``) says
    which fields an example needs; other fields are dropped, so fingerprints cover content only.
    """
    path = _check_exists(path, "data file")
    if task != "causal-lm" and path.suffix not in JSON_SUFFIXES:
        raise InputError(f"{path}: --task {task} reads JSONL (one JSON object per line); convert the file")
    if path.is_dir() or path.suffix in TABLE_SUFFIXES:
        docs = _clean_table(_read_table(path), path)
    elif path.suffix in JSON_SUFFIXES:
        records = _iter_json_records(path)
        clean = _clean_record if task == "causal-lm" else lambda o, at: _clean_task_record(o, at, task)
        docs = Records([clean(obj, at) for at, obj in records], [at for at, _ in records])
    else:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
        items, locations, block, start = [], [], [], 0
        for n, line in enumerate([*raw.split("\n"), ""], start=1):  # a trailing "" ends the last block
            if line.strip(" \t"):
                start = start or n
                block.append(line)
            elif block:
                items.append({"text": "\n".join(block).strip()})
                locations.append(f"{path}, line {start}")
                block, start = [], 0
        docs = Records(items, locations)
    if len(docs) == 0:
        raise InputError(f"data file {path} contains no documents; give at least one")
    return docs


def query_example(query: dict, task: str = "causal-lm") -> dict:
    """The example a query's measurement runs on (the other fields are for the report)."""
    if task == "seq-cls":
        return {k: query[k] for k in ("text", "text_pair", "label") if k in query}
    if task == "seq2seq":
        return {"source": query["prompt"], "target": query["completion"]}
    return {"prompt": query["prompt"], "completion": query["completion"]}


def read_queries(path: str | Path, task: str = "causal-lm") -> list[dict]:
    """Queries from JSONL: ``{"prompt": ..., "completion": ...}`` per line.

    With ``task="seq-cls"``: ``{"text": ..., "label": int}`` (shown as the prompt and its label);
    with ``"seq2seq"``: ``{"source", "target"}`` or ``{"prompt", "completion"}``. Extra fields
    pass through unchanged for the report (e.g. ``"relevant"``: training indices known to state
    the query's answer, which turns on recall@k).
    """
    path = _check_exists(path, "queries file")
    if path.is_dir():
        raise InputError(f"queries file {path} is a directory; pass a JSONL file")
    queries, locations = [], []
    for at, obj in _iter_json_records(path):
        where = at
        if task != "causal-lm" and isinstance(obj, dict):
            example = _clean_task_record(obj, where, task)
            shown = (
                (example.get("text", ""), f" -> label {example['label']}")
                if task == "seq-cls"
                else (example["source"], example["target"])
            )
            obj = {**obj, "prompt": shown[0], "completion": shown[1]}
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("prompt"), str)
            or not isinstance(obj.get("completion"), str)
        ):
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise InputError(f"{where}: a query needs string fields 'prompt' and 'completion' (found {found})")
        if not obj["completion"]:
            raise InputError(f"{where}: 'completion' is empty; the query measures its log-probability")
        rel = obj.get("relevant")
        if rel is not None and (
            not isinstance(rel, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in rel)
        ):
            raise InputError(f"{where}: 'relevant' must be a list of training indices")
        taken = sorted(RESERVED_QUERY_FIELDS & set(obj))
        if taken:
            raise InputError(f"{where}: field(s) {taken} are written by headwater into results.jsonl; rename them")
        queries.append(obj)
        locations.append(where)
    if not queries:
        raise InputError(f"queries file {path} contains no queries; give at least one JSON line")
    return Records(queries, locations)


def check_relevant(queries: list[dict], n_train: int, data_name: str) -> None:
    """Every ``relevant`` index must name a training example; say which query line does not."""
    for i, q in enumerate(queries):
        bad = [j for j in q.get("relevant") or [] if not 0 <= j < n_train]
        if bad:
            raise InputError(
                f"{where(queries, 'queries', i)}: 'relevant' index {bad[0]} is out of range for the {n_train} "
                f"documents of {data_name} (indices count from 0)"
            )


def document_text(item: Any, tokenizer: Any = None) -> str:
    """A readable text for one training example (for results and the report)."""
    if isinstance(item, str):
        return item
    if "text" in item:
        return item["text"]
    if "prompt" in item:
        return item["prompt"] + item["completion"]
    if "source" in item:
        return f"{item['source']} => {item['target']}"
    if tokenizer is not None:
        return tokenizer.decode(list(item["input_ids"]))
    return " ".join(str(t) for t in item["input_ids"])


def file_sha256(path: str | Path) -> str:
    """Content hash of a file or directory tree (first 16 hex digits), read in 1 MiB chunks."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def tokenizer_sha256(path: str | Path) -> str:
    """Content hash of a tokenizer's files only (not the weights that may share its directory)."""
    path = Path(path)
    h = hashlib.sha256()
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "added_tokens.json"):
        if (path / name).is_file():
            h.update(name.encode())
            h.update((path / name).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split())


def _check_model_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"{what} directory {path} does not exist; pass a local Hugging Face directory "
            "(one written by save_pretrained)"
        )
    if not path.is_dir():
        raise InputError(f"{what} path {path} is a file; pass the directory that holds it")
    return path


DTYPES = ("float32", "bfloat16", "float16", "auto")


def _dtype_keyword() -> str:
    """transformers 4.56 renamed from_pretrained's ``torch_dtype`` to ``dtype``."""
    try:
        import transformers

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except Exception:  # pragma: no cover - odd version strings
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


_AUTO = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
_WHAT = {"causal-lm": "causal language model", "seq-cls": "sequence classifier", "seq2seq": "seq2seq model"}


def load_model(path: str | Path, device: str = "auto", dtype: str = "float32", task: str = "causal-lm") -> Any:
    """The ``task``'s HF auto model from a local directory, offline, in eval mode on ``device``.

    A directory written by ``PeftModel.save_pretrained`` (it holds ``adapter_config.json``) is
    loaded as its base model with the adapter attached (``peft``, an optional dependency).
    """
    import torch
    import transformers

    path = _check_model_dir(path, "model")
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {DTYPES}")
    if task not in TASK_KINDS:
        raise InputError(f"--task {task!r} is not one of {TASK_KINDS}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kw = {_dtype_keyword(): torch_dtype, "local_files_only": True}
    try:
        if (path / "adapter_config.json").exists():
            try:
                import peft
            except ImportError as e:
                raise InputError(f"{path} holds a PEFT adapter; install peft (pip install headwater[peft])") from e
            auto = {
                "causal-lm": peft.AutoPeftModelForCausalLM,
                "seq-cls": peft.AutoPeftModelForSequenceClassification,
                "seq2seq": peft.AutoPeftModelForSeq2SeqLM,
            }[task]
            # is_trainable: the adapter's matrices are what headwater tracks by default on a PEFT model
            model = auto.from_pretrained(str(path), is_trainable=True, **kw)
        else:
            model = getattr(transformers, _AUTO[task]).from_pretrained(str(path), **kw)
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"cannot load a {_WHAT[task]} from {path}: {_first_line(e)}; it should hold "
            "config.json and model weights written by save_pretrained"
        ) from e
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = model.to(device)
    except Exception as e:
        raise InputError(f"cannot move the model to device {device!r}: {_first_line(e)}") from e
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer`` from a local directory, offline."""
    from transformers import AutoTokenizer

    path = _check_model_dir(path, "tokenizer")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise InputError(
            f"cannot load a tokenizer from {path}: it holds none of {', '.join(TOKENIZER_FILES)}; save one there "
            "with tokenizer.save_pretrained, or pass --tokenizer DIR"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise InputError(
            f"cannot load a tokenizer from {path}: {_first_line(e)}; save one there with "
            "tokenizer.save_pretrained, or pass --tokenizer DIR"
        ) from e


def context_length(model: Any, default: int = 1024) -> int:
    """The model's maximum sequence length, from its config (``default`` if it has none)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "seq_length", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return default
