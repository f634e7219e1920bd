"""Run configuration: pydantic models, YAML loading, `--set key=value` overrides.

Every section forbids unknown fields, so a misspelled key fails with one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # "minilm" (packaged all-MiniLM-L6-v2), "tiny-bert" (random, for tests), a local folder or a hub name
    name: str = "minilm"
    max_length: int = Field(64, gt=0)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # the frozen base weights' dtype (bf16 halves their memory; needs precision bf16/fp16); adapters stay fp32
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # causal LMs on CUDA: a 4-bit (NF4, double quantization) or 8-bit base via bitsandbytes (QLoRA)
    quantization: Literal[4, 8] | None = None


class TaskConfig(_Section):
    # registered task name (see `fedlora tasks`); or your data with `path`: "csv" / "jsonl" (the format, whatever
    # the suffix), "file" (format by suffix), "instructions" (JSONL instructions), "hf" (a `datasets` hub id or
    # folder, a save_to_disk folder, a parquet / arrow / json / csv file)
    name: str = "rt-sentiment"  # also "vqa": images + questions + answers (JSONL + image files, or an hf dataset)
    path: str | None = None
    split: str | None = None  # hf: the dataset split (None: "train", or the only one)
    kind: Literal["auto", "classification", "instructions"] = "auto"  # auto: instructions if those columns exist
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"  # instructions (alpaca / FlowerTune): prompt = instruction + input
    input_column: str = "input"
    output_column: str = "output"
    category_column: str = "category"  # the label of an instruction (natural clients, Dirichlet)
    image_column: str = "image"  # vqa: the image (a path relative to the JSONL file, or an `Image` feature)
    min_examples_per_label: int | None = Field(None, gt=0)  # refuse rarer labels (None: warn about singletons)
    max_examples: int | None = Field(None, gt=0)  # subsample the whole task (seeded), for quick runs
    max_per_class: int | None = Field(None, gt=0)  # cap examples per label (healthtweets: 500 per outlet)
    keep_labels: list[str] | None = None  # keep only these labels / categories (e.g. 6 chatterbot categories)
    # the label space (or a causal LM's categories) of `partition.scheme: files` / node-local data; None: the
    # sorted union of the clients' labels (on Flower: of what the nodes report when they join)
    labels: list[str] | None = None


class PartitionConfig(_Section):
    num_clients: int = Field(10, gt=0)
    # files: one file per client (`files`), each client's own data, as a Flower SuperNode holds it (--data)
    scheme: Literal["iid", "dirichlet", "shards", "natural", "files"] = "dirichlet"
    files: list[str] | None = None  # `files`: client i's CSV / JSONL file or local HF dataset folder
    test_files: list[str] | None = None  # `files`: client i's own test file (None: client_test_fraction of its file)
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration on the label
    shards_per_client: int = Field(2, gt=0)  # pathological split: label-sorted shards per client
    column: str | None = None  # `natural`: the column whose values are the clients
    min_partition_size: int = Field(10, ge=0)
    global_test_fraction: float = Field(0.2, gt=0, lt=1)  # held out before partitioning
    client_test_fraction: float = Field(0.2, gt=0, lt=1)  # each client's own test split
    # tuning: carve this fraction of each client's TRAIN part as its validation set (0: none)
    client_val_fraction: float = Field(0.0, ge=0, lt=1)


class AdapterConfig(_Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: query/value (BERT-style), q/k/v/o_proj (Llama-style)
    head_modules: list[str] | None = None  # None: detected ("classifier" / "score")
    # heterogeneous ranks: one rank per client, or tiers {rank: fraction of clients} assigned by a seeded
    # permutation (fedlora/ranks.py); the scale alpha / r stays the same on every client
    client_ranks: list[int] | dict[int, float] | None = None


class MethodConfig(_Section):
    """`name` and `head`, and one section per registered method that has options (`method.<name>`: e.g.
    `method.celora.beta`), each validated by the Options model declared beside its method (methods/<name>.py)
    and filled with its defaults when absent; an unregistered key fails like any unknown field."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # the sections: checked below

    name: str = "fedit"
    head: Literal["shared", "personal"] | None = None  # None: the method's default

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from .methods import METHODS  # here, not at the top: the methods import this module

        out, errors = dict(data), []
        name = out.get("name", "fedit")
        if isinstance(name, str) and name not in METHODS:
            errors.append(InitErrorDetails(type=PydanticCustomError(
                "unknown_method", "unknown method '{name}' (known: {known})",
                {"name": name, "known": ", ".join(sorted(METHODS))}), loc=("name",), input=name))
        sections = {m: c.options for m, c in sorted(METHODS.items()) if c.options is not None}
        for key in [k for k in out if k not in cls.model_fields]:
            if key not in sections:
                errors.append(InitErrorDetails(type="extra_forbidden", loc=(key,), input=out[key]))
                continue
            try:
                out[key] = sections[key].model_validate(out[key])
            except ValidationError as e:  # re-raised below with the section's name in front of each location
                errors += [InitErrorDetails(type=x["type"], loc=(key, *x["loc"]), input=x["input"],
                                            ctx=x.get("ctx", {})) for x in e.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        for key, options in sections.items():
            out.setdefault(key, options())
        return out


class FederationConfig(_Section):
    rounds: int = Field(5, gt=0)
    clients_per_round: int | None = Field(None, gt=0)  # None: every client, every round
    min_clients: int = Field(1, ge=1)
    dropout_rate: float = Field(0.0, ge=0, lt=1)  # a sampled client fails to return with this probability
    # reject an upload whose update (upload − what the client started the round with, L2 over all tensors) is larger
    max_update_norm: float | None = Field(None, gt=0)
    # the server's optimizer on the pseudo-gradient Δ = aggregate − current (server_opt.py); sgd at lr 1 is FedAvg
    server_optimizer: Literal["sgd", "avgm", "adam", "yogi", "adagrad"] = "sgd"
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)  # avgm
    server_beta1: float = Field(0.9, ge=0, lt=1)  # adam, yogi (adagrad: momentum on Δ as in Reddi et al.)
    server_beta2: float = Field(0.99, ge=0, lt=1)  # adam, yogi
    server_eps: float = Field(1e-3, gt=0)  # τ, the degree of adaptivity (Reddi et al.'s default 1e-3)
    # SecAgg+ (secagg.py): the server learns the example-weighted sum of the round's uploads, never one upload;
    # only for methods whose server step is such a sum (docs/secure-aggregation.md)
    secure_aggregation: bool = False
    secagg_neighbours: int | None = Field(None, ge=2)  # SecAgg+: each client masks with k others; None: all (SecAgg)
    # shares needed to unmask, as a fraction of a client's group (itself and its neighbours), at least 2
    secagg_threshold: float = Field(0.5, gt=0, le=1)
    secagg_clip_range: float = Field(8.0, gt=0)  # values quantized over [-c, c]; a client with a larger one withholds
    secagg_quantization_bits: int = Field(24, ge=4, le=40)  # 2^bits levels over [-c, c]: step 2c / 2^bits


class TrainConfig(_Section):
    local_steps: int = Field(10, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: the local solver FedProx's and SCAFFOLD's analyses assume
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)  # A and B
    lr_c: float = Field(1e-1, gt=0)  # the tri-matrix core C: needs a much higher lr than LoRA (0.1 won on validation)
    lr_head: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # clients trained together in one batched pass over the frozen base (adapters stacked, torch.bmm);
    # "auto": 1 on a CPU (its matmuls are already compute-bound), on a GPU as many as fit in memory
    clients_per_pass: int | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _check_clients_per_pass(self) -> TrainConfig:
        k = self.clients_per_pass
        if k != "auto" and (isinstance(k, bool) or k < 1):
            raise ValueError(f"train.clients_per_pass must be 'auto' or a positive integer, got {k!r}")
        return self


class EvalConfig(_Section):
    # personal metrics on a fixed seeded subset of this many clients (None: every client) ...
    clients: int | None = Field(None, gt=0)
    participants: bool = False  # ... plus the clients that took part in the round
    # "validation": evaluate on the clients' validation sets (partition.client_val_fraction) instead of the
    # test splits, and the global metric on their union: tune on this, report on "test"
    split: Literal["test", "validation"] = "test"
    every: int = Field(1, gt=0)  # evaluate every k rounds (and always after the last)
    batch_size: int = Field(64, gt=0)
    max_global_examples: int | None = Field(1000, gt=0)
    max_client_examples: int | None = Field(None, gt=0)
    # methods with personal state have one model per client: global accuracy is their mean over a
    # fixed seeded subset of this many clients (None: all), since each costs a pass over the global test
    global_clients: int | None = Field(10, gt=0)
    # causal LM: greedy answers to this many held-out prompts per client at the last round (ROUGE-L, exact match)
    generate_examples: int = Field(4, ge=0)
    baseline: bool = False  # also evaluate the untrained model (ΔW = 0) before round 1 -> baseline.json
    max_new_tokens: int = Field(32, gt=0)
    # your metrics: registered names (fedlora.register_metric) or "module:function", e.g.
    # "sklearn.metrics:balanced_accuracy_score"; columns global_<name> / personal_<name>
    metrics: list[str] = Field(default_factory=list)
    # the summary's best round maximizes this (a loss or perplexity: minimizes) on VALIDATION data, never on
    # test; None: personal_accuracy (classification), personal_loss (causal LM)
    best_metric: str | None = None
    # `partition.scheme: files`: the server's own global test file; None: global metrics are the example-weighted
    # aggregate of the clients' reports
    server_test: str | None = None


class OutputConfig(_Section):
    dir: str = "runs"
    save_client_states: bool = True
    # experiment trackers, each round: metrics, bytes, wall time (and CE-LoRA's weight heatmap).
    # tensorboard writes <run_dir>/tensorboard; wandb and mlflow need `pip install fedlora[trackers]`
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)


# ---- privacy: client-level DP, see fedlora/privacy/dp.py ----
class PrivacyConfig(_Section):
    dp: Literal["none", "local", "central"] = "none"  # local: noise on each upload; central: on the aggregate
    clip: float = Field(1.0, gt=0)  # S: L2 bound of each upload's delta (upload − start), all tensors together
    noise_multiplier: float = Field(0.0, ge=0)  # sigma: Gaussian noise std = sigma · S
    delta: float = Field(1e-5, gt=0, lt=1)  # the delta of the reported (epsilon, delta)


class RunConfig(_Section):
    name: str = "run"
    seed: int = Field(0, ge=0)  # training randomness: adapter init, batch order, sampling, dropout, noise
    # the data split (held-out set, partition, client test / validation carves, evaluation samples);
    # None: the same as `seed`. Fix it and vary `seed` to measure training noise on one split
    data_seed: int | None = Field(None, ge=0)
    threads: int | None = Field(None, gt=0)  # torch threads; None: torch's default
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")  # auto: cuda, else mps, else cpu
    # bf16/fp16: autocast, fp32 master copies of adapters, head and optimizer state (see fedlora/compute.py)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @property
    def split_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        n = self.partition.num_clients
        if self.federation.clients_per_round is not None and self.federation.clients_per_round > n:
            raise ValueError(f"federation.clients_per_round ({self.federation.clients_per_round}) "
                             f"> partition.num_clients ({n})")
        if self.federation.min_clients > n:
            raise ValueError(f"federation.min_clients ({self.federation.min_clients}) > partition.num_clients ({n})")
        cr = self.adapter.client_ranks
        if isinstance(cr, list) and len(cr) != n:
            raise ValueError(f"adapter.client_ranks: {len(cr)} ranks for partition.num_clients {n}")
        if cr is not None and (not cr or min(cr) <= 0):
            raise ValueError(f"adapter.client_ranks: ranks must be positive, got {cr}")
        if isinstance(cr, dict) and (min(cr.values()) <= 0 or abs(sum(cr.values()) - 1) > 1e-6):
            raise ValueError(f"adapter.client_ranks: tier fractions must be positive and sum to 1, got {cr}")
        if self.model.dtype != "fp32" and self.precision == "fp32" and self.model.quantization is None:
            raise ValueError(f"model.dtype {self.model.dtype} needs precision bf16 or fp16 (autocast mixes the "
                             "base's dtype with the fp32 adapters)")
        if self.eval.clients is not None and self.eval.clients > n:
            raise ValueError(f"eval.clients ({self.eval.clients}) > partition.num_clients ({n})")
        p = self.partition
        for name in ("files", "test_files"):
            files = getattr(p, name)
            if files is not None and len(files) != n:
                raise ValueError(f"partition.{name} lists {len(files)} files but partition.num_clients is {n}")
        if p.scheme != "files" and (p.files or p.test_files or self.eval.server_test):
            raise ValueError("partition.files, partition.test_files and eval.server_test need partition.scheme 'files'")
        if self.eval.split == "validation" and self.partition.client_val_fraction == 0:
            raise ValueError("eval.split is 'validation' but partition.client_val_fraction is 0")
        from .methods import get_method  # here, not at the top: the methods import this module

        method = get_method(self.method.name)
        method.check(self)  # the method's own checks, declared beside it (a refusal of secure aggregation too)
        if self.federation.secure_aggregation:
            if not method.secure_sum:
                raise ValueError(f"federation.secure_aggregation: method {method.name} sends the server nothing to "
                                 f"sum (or needs each client's upload)")
            if (self.federation.clients_per_round or n) < 2:
                raise ValueError("federation.secure_aggregation needs at least 2 clients per round")
            if self.privacy.dp == "central":
                raise ValueError("privacy.dp: central DP calibrates its noise to each client's weight, which secure "
                                 "aggregation hides from the server; use local")
        return self


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "invalid config: " + "; ".join(parts)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for p in path:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
    d[last] = value


def parse_overrides(pairs: list[str]) -> dict:
    """`["train.lr=3e-4", "method.name=ffa"]` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(data: dict | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    data = data or {}
    if overrides:
        data = _merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def load_config(path: str | Path, overrides: list[str] | dict | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return build_config(data, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
