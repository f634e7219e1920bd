"""Run configuration: pydantic models, YAML loading, `--set key=value` overrides.

Every section forbids unknown fields, so a misspelled key fails with one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field or file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # "minilm" (packaged all-MiniLM-L6-v2), "tiny-bert" (random, for tests), a local folder or a hub name
    name: str = "minilm"
    max_length: int = Field(64, gt=0)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time


class TaskConfig(_Section):
    # registered task name (see `fedlora tasks`) or "csv" / "jsonl" with `path`
    name: str = "rt-sentiment"
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
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


class CELoRAConfig(_Section):
    ab_init: Literal["svd", "random"] = "svd"
    # frozen: A, B never train (C means the same on every client); local: they train and stay personal;
    # warmup: they train in rounds 1..ab_warmup_rounds of the run, then freeze
    ab_train: Literal["frozen", "local", "warmup"] = "local"
    ab_warmup_rounds: int = Field(2, ge=0)
    beta: float = Field(0.5, ge=0, le=1)  # weight of data-space vs parameter-space similarity
    # the others' softmax temperature, on z-scored similarities (unit spread per row); large -> by example share
    tau: float = Field(1.0, gt=0)
    # w_ii: a number (untuned default 0.5), or auto (self scored as its most similar other)
    self_weight: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = 0.5
    # softmax; learned: the others' weights refined by alignment with the client's update; fedavg: plain FedAvg of C
    weights: Literal["softmax", "learned", "fedavg"] = "softmax"
    learned_steps: int = Field(20, ge=0)
    learned_lambda: float = Field(1.0, ge=0)  # pull towards the softmax weights
    learned_lr: float = Field(0.1, gt=0)
    # what the data descriptor holds: overall feature mean and variance (2 x hidden numbers), or per class
    descriptor: Literal["overall", "per_class"] = "overall"
    # the data descriptor's private release: clip it to L2 norm descriptor_clip, add N(0, (sigma·clip)²);
    # with privacy.dp on, its (sigma, 1 release) is composed into the run's epsilon
    descriptor_sigma: float = Field(0.0, ge=0)
    descriptor_clip: float = Field(1.0, gt=0)
    param_center: bool = False  # subtract the round's mean ΔC before the cosine (removes the drift all share)


class MethodConfig(_Section):
    name: str = "fedit"
    head: Literal["shared", "personal"] | None = None  # None: the method's default
    celora: CELoRAConfig = Field(default_factory=CELoRAConfig)


class FederationConfig(_Section):
    rounds: int = Field(5, gt=0)
    clients_per_round: int | None = Field(None, gt=0)  # None: every client, every round
    min_clients: int = Field(1, ge=1)
    dropout_rate: float = Field(0.0, ge=0, lt=1)  # a sampled client fails to return with this probability
    max_update_norm: float | None = Field(None, gt=0)  # reject uploads whose L2 norm is larger


class TrainConfig(_Section):
    local_steps: int = Field(10, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)  # A and B
    lr_c: float = Field(1e-1, gt=0)  # the tri-matrix core C: needs a much higher lr than LoRA (0.1 won on validation)
    lr_head: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)


class EvalConfig(_Section):
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
    # `partition.scheme: files`: the server's own global test file; None: global metrics are the example-weighted
    # aggregate of the clients' reports
    server_test: str | None = None


class OutputConfig(_Section):
    dir: str = "runs"
    save_client_states: bool = True


# ---- privacy (issue 7): client-level DP, see fedlora/privacy/dp.py ----
class PrivacyConfig(_Section):
    dp: Literal["none", "local", "central"] = "none"  # local: noise on each upload; central: on the aggregate
    clip: float = Field(1.0, gt=0)  # S: L2 bound of each upload's delta (upload − start), all tensors together
    noise_multiplier: float = Field(0.0, ge=0)  # sigma: Gaussian noise std = sigma · S
    delta: float = Field(1e-5, gt=0, lt=1)  # the delta of the reported (epsilon, delta)


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    threads: int | None = Field(None, gt=0)  # torch threads; None: torch's default
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

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        n = self.partition.num_clients
        if self.federation.clients_per_round is not None and self.federation.clients_per_round > n:
            raise ValueError(f"federation.clients_per_round ({self.federation.clients_per_round}) "
                             f"> partition.num_clients ({n})")
        if self.federation.min_clients > n:
            raise ValueError(f"federation.min_clients ({self.federation.min_clients}) > partition.num_clients ({n})")
        if self.privacy.dp == "central" and self.method.name == "celora":
            raise ValueError("privacy.dp: central DP is not supported for celora (personalized C̄); use local")
        c = self.method.celora
        if self.privacy.dp != "none" and self.method.name == "celora" and c.beta > 0 and c.descriptor_sigma == 0:
            raise ValueError("privacy.dp is on but CE-LoRA's data descriptor (used when method.celora.beta > 0) "
                             "would be released without noise: set method.celora.descriptor_sigma > 0 or beta 0")
        p = self.partition
        for name in ("files", "test_files"):
            files = getattr(p, name)
            if files is not None and len(files) != n:
                raise ValueError(f"partition.{name} lists {len(files)} files but partition.num_clients is {n}")
        if p.scheme != "files" and (p.files or p.test_files or self.eval.server_test):
            raise ValueError("partition.files, partition.test_files and eval.server_test need partition.scheme 'files'")
        if self.eval.split == "validation" and self.partition.client_val_fraction == 0:
            raise ValueError("eval.split is 'validation' but partition.client_val_fraction is 0")
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
