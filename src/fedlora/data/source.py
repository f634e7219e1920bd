"""One loader for a user's data, wherever it lives: a CSV / JSONL / JSON / parquet / arrow file, a folder
saved with `datasets.save_to_disk`, a `datasets` data folder or hub id, a `Dataset` object, or rows in memory.

Everything becomes one table (a pandas DataFrame), then one column mapping turns it into a `Task`:
- classification: `text_column` -> `label_column` (a `datasets` ClassLabel keeps its names);
- instructions (alpaca / FlowerTune style): `instruction_column` [+ `input_column`] -> `output_column`,
  with `category_column` (if present) as the label that Dirichlet and natural partitions split on.
The prompt template is applied later, by the tokenizer's chat template (`data.loader.tokenize_causal`).

The simulation's `task.name: hf | csv | jsonl | file | instructions`, the Python API's client datasets and
a Flower node's local data all come through `load_task_source`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from .tasks import Task, encode

Kind = Literal["auto", "classification", "instructions"]
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
                ".arrow": "arrow"}
HUB_HINT = ("download it where there is network (`datasets.load_dataset('{}').save_to_disk(DIR)`), "
            "copy DIR here and set task.path to DIR")


def read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line; an error names the file's real line number (blank lines count)."""
    rows, lines = [], []
    for i, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"task.path: {path} line {i} is not JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"task.path: {path} line {i} is not a JSON object")
        rows.append(row)
        lines.append(i)
    df = pd.DataFrame(rows)
    df.attrs["lines"] = lines  # each row's line in the file, for errors
    return df


def _text(path: Path) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is reported with its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"task.path: {path} line {line} is not UTF-8 (byte 0x{data[e.start]:02x}): "
                         f"re-save the file as UTF-8") from None


def read_file(path: Path, fmt: str | None = None) -> tuple[pd.DataFrame, Any]:
    """A data file as a table; `fmt` (csv / jsonl / json / parquet / arrow) overrides the suffix."""
    fmt = fmt or FILE_FORMATS.get(path.suffix.lower(), "csv")
    if fmt == "jsonl":
        return read_jsonl(path), None
    if fmt == "json":
        text = _text(path)
        if not text.lstrip().startswith("["):
            return read_jsonl(path), None
        return _guarded(lambda: pd.DataFrame(json.loads(text)), path), None
    if fmt == "csv":
        text = _text(path)
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        return _guarded(lambda: pd.read_csv(io.StringIO(text), sep=sep), path), None
    from datasets import Dataset

    if fmt == "parquet":
        ds = _guarded(lambda: Dataset.from_parquet(str(path)), path)
    elif fmt == "arrow":
        ds = _guarded(lambda: Dataset.from_file(str(path)), path)
    else:
        known = sorted(set(FILE_FORMATS.values()))
        raise ValueError(f"task.path: unknown file format '{fmt}' for {path} (known: {known})")
    return ds.to_pandas(), ds.features


def _guarded(read, path: Path):
    try:
        return read()
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise ValueError(f"task.path: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def _pick_split(dd, split: str | None, where: str):
    names = list(dd.keys())
    if split is None:
        if "train" in names or len(names) == 1:
            split = "train" if "train" in names else names[0]
        else:
            raise ValueError(f"task.split: {where} has splits {names}; choose one")
    if split not in names:
        raise ValueError(f"task.split: {where} has no split '{split}' (splits: {names})")
    return dd[split]


def read_source(source: Any, split: str | None = None, fmt: str | None = None) -> tuple[pd.DataFrame, Any, str]:
    """(table, `datasets` features or None, a name) for any supported source."""
    from datasets import Dataset, DatasetDict, IterableDataset

    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True), None, "data"
    if isinstance(source, DatasetDict):
        source = _pick_split(source, split, "the DatasetDict")
    if isinstance(source, IterableDataset):
        raise ValueError("task: an IterableDataset cannot be partitioned; load it with streaming=False")
    if isinstance(source, Dataset):
        return source.to_pandas(), source.features, "data"
    if isinstance(source, list | tuple):
        return pd.DataFrame(list(source)), None, "data"
    if isinstance(source, dict):
        return pd.DataFrame(source), None, "data"
    if not isinstance(source, str | Path):
        raise ValueError(f"task: cannot load data from a {type(source).__name__} (a path, hub id, Dataset, "
                         f"DataFrame or list of dicts)")
    p = Path(source).expanduser()
    if p.is_file():
        table, features = read_file(p, fmt)
        return table, features, p.stem
    if p.is_dir():
        if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            from datasets import load_from_disk

            ds = _guarded(lambda: load_from_disk(str(p)), p)
        else:  # a folder of data files, or a loading script's folder
            ds = _load_dataset(str(p), split)
        table, features, _ = read_source(ds, split)
        return table, features, p.name
    if str(source).startswith((".", "/", "~")) or p.suffix.lower() in FILE_FORMATS:
        raise FileNotFoundError(f"task.path: file not found: {source}")
    ds = _load_dataset(str(source), split)  # a hub id
    table, features, _ = read_source(ds, split)
    return table, features, str(source).rsplit("/", 1)[-1]


def _load_dataset(path: str, split: str | None):
    from datasets import load_dataset

    try:
        return load_dataset(path) if split is None else load_dataset(path, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ValueError(f"task.split: dataset '{path}': {str(e).splitlines()[0]}") from None
        raise ValueError(f"task.path: cannot load dataset '{path}': {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - no network, no cache, no such dataset: one line, with the way out
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"task.path: cannot load dataset '{path}' (not a local file or folder, and not reachable "
                         f"on the hub or in its cache: {msg[:160]}); {HUB_HINT.format(path)}") from None


def _column(df: pd.DataFrame, col: str, field: str, where: str) -> None:
    if col not in df.columns:
        raise ValueError(f"{field}: no column '{col}' in {where} (columns: {list(df.columns)})")


def _label_values(series: pd.Series, features: Any, col: str) -> list:
    """Label values as names: a `datasets` ClassLabel's ints become its names."""
    feature = features.get(col) if features is not None else None
    names = getattr(feature, "names", None)
    if names:
        return [names[int(v)] for v in series]
    return series.tolist()


def load_task_source(source: Any, *, split: str | None = None, kind: Kind = "auto", fmt: str | None = None,
                     text_column: str = "text", label_column: str = "label",
                     instruction_column: str = "instruction", input_column: str = "input",
                     output_column: str = "output", category_column: str = "category",
                     name: str | None = None) -> Task:
    """Any supported data source -> a classification or instruction `Task` (see the module docstring).

    `kind="auto"` is instructions when the table has `instruction_column` and `output_column`, else
    classification. `fmt` forces a file's format (csv / jsonl / json / parquet / arrow)."""
    df, features, default_name = read_source(source, split, fmt)
    where = str(source) if isinstance(source, str | Path) else "the data"
    name = name or default_name
    if df.empty:
        raise ValueError(f"task.path: {where} holds no rows")
    if kind == "auto":
        kind = "instructions" if instruction_column in df.columns and output_column in df.columns \
            else "classification"
    if kind == "instructions":
        _column(df, instruction_column, "task.instruction_column", where)
        _column(df, output_column, "task.output_column", where)
        missing = df[instruction_column].isna() | df[output_column].isna()
        if missing.any():
            i = int(missing.values.argmax())
            at = f"line {df.attrs['lines'][i]}" if "lines" in df.attrs else f"row {i + 1}"
            raise ValueError(f"task.path: {where} {at} needs '{instruction_column}' and '{output_column}'")
        inputs = df[input_column] if input_column in df.columns else pd.Series([""] * len(df))
        prompts = [str(q) + (f"\n\n{x}" if isinstance(x, str) and x.strip() else "")
                   for q, x in zip(df[instruction_column], inputs, strict=True)]
        cats = ([("all" if pd.isna(c) else str(c)) for c in _label_values(df[category_column], features,
                                                                             category_column)]
                if category_column in df.columns else ["all"] * len(df))
        extra = {c: df[c].astype(str).tolist() for c in df.columns
                 if c not in (instruction_column, input_column, output_column, category_column)}
        return encode(name, prompts, cats, {**extra, "category": cats},
                      targets=[str(a) for a in df[output_column]])
    _column(df, text_column, "task.text_column", where)
    _column(df, label_column, "task.label_column", where)
    df = df.dropna(subset=[text_column, label_column]).reset_index(drop=True)
    if df.empty:
        raise ValueError(f"task.path: {where} has no rows with both '{text_column}' and '{label_column}'")
    extra = {c: df[c].astype(str).tolist() for c in df.columns if c not in (text_column, label_column)}
    return encode(name, df[text_column].astype(str).tolist(), _label_values(df[label_column], features, label_column),
                  extra)


def merge_tasks(tasks: list[Task], column: str = "client") -> Task:
    """Several clients' tasks as one (labels re-encoded over the union), with `column` naming each row's client."""
    if len({t.causal for t in tasks}) > 1:
        raise ValueError("clients: every client's data must be the same kind (all classification or all instructions)")
    texts, labels, targets, cols = [], [], [], {column: []}
    shared = set.intersection(*(set(t.columns) for t in tasks)) - {column}
    for cid, t in enumerate(tasks):
        texts += t.texts
        labels += [t.label_names[y] for y in t.labels]
        targets += t.targets or []
        cols[column] += [str(cid)] * len(t.texts)
        for c in shared:
            cols.setdefault(c, []).extend(t.columns[c])
    return encode(tasks[0].name, texts, labels, cols, targets if tasks[0].causal else None)


def load_vqa_source(source: Any, *, split: str | None = None, image_column: str = "image",
                    question_column: str | None = None, answer_column: str = "answer",
                    category_column: str = "category", name: str | None = None) -> Task:
    """Image-question-answer data: a JSONL file (or a folder holding one) of `image` (a path, relative to the
    file's folder), `question` or `prompt`, `answer`; or a Hugging Face dataset (folder or hub id) whose
    `image_column` is an `Image` feature. The label is the answer; `category` (if present) a column for natural
    clients. A missing image names its path and line; an image column that holds no image names the column."""
    p = Path(source).expanduser() if isinstance(source, str | Path) else None
    if p is not None and p.is_dir() and not any((p / f).is_file() for f in ("dataset_info.json", "state.json",
                                                                           "dataset_dict.json")):
        found = sorted(p.glob("*.jsonl"))
        if len(found) == 1:
            p = found[0]
    df, features, default_name = read_source(p if p is not None else source, split, "jsonl" if p is not None and
                                             p.suffix == ".jsonl" else None)
    where = str(p if p is not None else source)
    if df.empty:
        raise ValueError(f"task.path: {where} holds no rows")
    _column(df, image_column, "task.image_column", where)
    question = question_column or ("question" if "question" in df.columns else "prompt")
    _column(df, question, "task.text_column (question / prompt)", where)
    _column(df, answer_column, "task.output_column (answer)", where)
    lines = df.attrs.get("lines") or list(range(1, len(df) + 1))
    at = "line" if "lines" in df.attrs else "row"
    from datasets import Image as ImageFeature

    if features is not None and isinstance(features.get(image_column), ImageFeature):
        images = list(df[image_column])  # {"bytes", "path"} per row, decoded once by data/images.py
    elif features is not None or not all(isinstance(v, str) for v in df[image_column]):
        raise ValueError(f"task.image_column: column '{image_column}' of {where} holds no image (an Image feature, "
                         f"or image file paths)")
    else:
        base = p.parent if p is not None and p.is_file() else Path(".")
        images = []
        for line, v in zip(lines, df[image_column], strict=True):
            f = base / v
            if not f.is_file():
                raise ValueError(f"task.path: {where} {at} {line}: image '{f}' not found")
            images.append(str(f))
    answers = [str(a).strip() for a in df[answer_column]]
    cats = df[category_column].astype(str).tolist() if category_column in df.columns else ["all"] * len(df)
    return encode(name or (p.stem if p is not None else default_name), df[question].astype(str).tolist(), answers,
                  {"image": images, "image_where": [f"{where} {at} {ln}" for ln in lines], "category": cats},
                  targets=answers)
