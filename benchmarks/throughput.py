"""Throughput: optimizer steps per second and round wall time, per {device} × {precision}, MiniLM and SmolLM2.

The models are randomly initialised from their configs: step times do not depend on trained weights, and
nothing has to be carried to a GPU machine. Each arm holds its own copy of the same model; the arms
alternate (fp32, bf16, fp32, bf16, ...) in one process so that the ratios share the machine's load. A
round is fedlora's own client loop: per client set_state, `local_train` (autocast, on-device loss),
get_state; then `evaluate` with the adapter merged. CUDA arms are skipped, with the reason printed,
when no GPU is present.

Only torch, transformers and fedlora's torch-only modules are imported (adapters, train, compute, models),
so `benchmarks/gpu_check.sh` runs it on a bare GPU machine.

    PYTHONPATH=src python benchmarks/throughput.py              # CPU rows at full size (a few minutes)
    PYTHONPATH=src python benchmarks/throughput.py --quick      # 2-layer shapes, seconds (the test suite)
    PYTHONPATH=src python benchmarks/throughput.py --models smollm2 --arms cuda-fp32,cuda-bf16
    PYTHONPATH=src python benchmarks/throughput.py --models minilm --clients 20 \
        --arms cuda-fp32,cuda-fp32-k4,cuda-fp32-k8,cuda-fp32-k20    # K clients per batched pass vs K = 1
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fedlora.adapters import AdaptedModel, inject_adapters
from fedlora.compute import native_bf16_cpu
from fedlora.sweep import write_json
from fedlora.train import evaluate, evaluate_lm, local_train, local_train_stacked

# all-MiniLM-L6-v2 and SmolLM2-135M, as their config.json say (used when the packaged folders are absent)
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True)
TARGETS = {"minilm": ["query", "value"], "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# (batch, length, local steps, clients per round, eval examples) per model and size
SIZES = {
    "quick": {"minilm": (4, 16, 2, 2, 8), "smollm2": (2, 16, 2, 1, 4)},
    "cpu": {"minilm": (16, 48, 10, 2, 64), "smollm2": (4, 64, 3, 1, 8)},
    "cuda": {"minilm": (64, 128, 20, 4, 512), "smollm2": (16, 256, 10, 2, 64)},
}
TRAIN = SimpleNamespace(lr=1e-3, lr_c=0.1, lr_head=1e-2, weight_decay=0.0, max_grad_norm=1.0,  # TrainConfig's
                        optimizer="adamw")


def minilm_config() -> BertConfig:
    try:  # the packaged model's own config, where it is installed
        from fedlora.models import minilm_dir

        return BertConfig.from_pretrained(minilm_dir(), num_labels=2)
    except Exception:  # noqa: BLE001 - a bare GPU machine: the same shape, written out
        return BertConfig(**MINILM, num_labels=2)


def build(model: str, quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "minilm":
        cfg = minilm_config()
    else:
        cfg = LlamaConfig(**SMOLLM2)
    if quick:
        cfg.num_hidden_layers = 2
    return (BertForSequenceClassification if model == "minilm" else LlamaForCausalLM)(cfg).eval()


@dataclass
class RandomTokens:
    """Random token batches with the interface `local_train` and `evaluate` read from `Examples` / `BatchStream`."""

    input_ids: torch.Tensor  # (n, L)
    labels: torch.Tensor  # (n,) classes, or (n, L) next-token targets
    batch_size: int

    def __post_init__(self) -> None:
        self.attention_mask = torch.ones_like(self.input_ids)
        self.order = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.input_ids)

    def next_rows(self) -> torch.Tensor:
        return torch.from_numpy(self.order.choice(len(self), self.batch_size, replace=False))

    def batch(self, rows) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "labels": self.labels[rows]}


def random_tokens(model: str, vocab: int, n: int, length: int, batch: int) -> RandomTokens:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone() if model == "smollm2" else torch.randint(0, 2, (n,), generator=g)
    return RandomTokens(ids, labels, batch)


def sequential_round(am: AdaptedModel, states: list[dict], train: RandomTokens, test: RandomTokens, steps: int,
                     causal: bool) -> int:
    """One round: each client in turn loads its state, trains `steps` steps, keeps its new state; then eval."""
    factors = {"A", "B"} if causal else {"A", "B", "head"}
    for cid, state in enumerate(states):
        am.set_state(state)
        local_train(am, train, train, factors, TRAIN, steps)
        states[cid] = am.get_state()
    (evaluate_lm if causal else evaluate)(am, test, 64)
    return steps * len(states)


def batched_round(k: int) -> Callable[..., int]:
    """The same round with K clients per batched pass (`train.clients_per_pass`): `local_train_stacked`."""
    def round_fn(am: AdaptedModel, states: list[dict], train: RandomTokens, test: RandomTokens, steps: int,
                 causal: bool) -> int:
        factors = {"A", "B"} if causal else {"A", "B", "head"}
        keep = set(states[0])
        for i in range(0, len(states), k):
            group = states[i:i + k]
            trained, _ = local_train_stacked(am, group, [train] * len(group), [train] * len(group), factors, TRAIN,
                                             steps, keep)
            states[i:i + len(group)] = trained
        (evaluate_lm if causal else evaluate)(am, test, 64)
        return steps * len(states)
    return round_fn


# The round of each arm: name -> (device, precision, round function). "-k<K>": K clients per batched pass,
# compared with the same device and precision at K = 1 (run them with --clients at least K).
ARMS: dict[str, tuple[str, str, Callable[..., int]]] = {
    "cpu-fp32": ("cpu", "fp32", sequential_round),
    "cpu-bf16": ("cpu", "bf16", sequential_round),
    "cuda-fp32": ("cuda", "fp32", sequential_round),
    "cuda-bf16": ("cuda", "bf16", sequential_round),
    **{f"{d}-{p}-k{k}": (d, p, batched_round(k)) for d in ("cpu", "cuda") for p in ("fp32", "bf16")
       for k in (4, 8, 20, 50)},
}
DEFAULT_ARMS = ["cpu-fp32", "cpu-bf16", "cuda-fp32", "cuda-bf16"]


def skip_reason(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_model(model: str, arms: list[str], size: str, quick: bool, repeats: int, steps: int | None = None,
                clients: int | None = None) -> list[dict]:
    base = build(model, quick)
    causal = model == "smollm2"
    batch, length, size_steps, size_clients, n_eval = SIZES[size][model]
    steps, clients = steps or size_steps, clients or size_clients
    train = random_tokens(model, base.config.vocab_size, max(4 * batch, 32), length, batch)
    test = random_tokens(model, base.config.vocab_size, n_eval, length, batch)
    runs = {}
    for arm in arms:
        device, precision, round_fn = ARMS[arm]
        am = inject_adapters(copy.deepcopy(base).to(device), TARGETS[model], 8, 16.0)
        am.precision = precision
        states = [am.get_state() for _ in range(clients)]
        round_fn(am, states, train, test, 1, causal)  # warm-up: kernels, allocator, autocast caches
        runs[arm] = {"am": am, "states": states, "fn": round_fn, "device": device, "times": [], "train_s": []}
    for _ in range(repeats):  # alternate the arms, so that the machine's load falls on each alike
        for r in runs.values():
            sync(r["device"])
            t0 = time.perf_counter()
            n_steps = r["fn"](r["am"], r["states"], train, test, steps, causal)
            sync(r["device"])
            r["times"].append(time.perf_counter() - t0)
            r["steps"] = n_steps
    rows = []
    for arm, r in runs.items():
        best = float(np.median(r["times"]))
        rows.append({"model": model, "arm": arm, "device": r["device"], "precision": ARMS[arm][1], "size": size,
                     "batch": batch, "length": length, "clients": clients, "steps_per_round": r["steps"],
                     "round_s": round(best, 4), "round_s_all": [round(x, 4) for x in r["times"]],
                     "steps_per_s": round(r["steps"] / best, 3)})
    by = {r["arm"]: r for r in rows}
    for r in rows:  # each arm against fp32 on the same device (at the same K), and against K = 1
        base_arm, _, k = r["arm"].partition("-k")
        ref = by.get(f"{r['device']}-fp32" + (f"-k{k}" if k else ""))
        r["speedup_vs_fp32"] = round(ref["round_s"] / r["round_s"], 3) if ref else None
        r["clients_per_pass"] = int(k) if k else 1
        k1 = by.get(base_arm)
        r["speedup_vs_k1"] = round(k1["round_s"] / r["round_s"], 3) if k1 else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"known: {', '.join(ARMS)}")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU arms)")
    ap.add_argument("--steps", type=int, default=None, help="local steps per client (default: the size's)")
    ap.add_argument("--clients", type=int, default=None, help="clients per round (default: the size's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms, skipped = [], {}
    for arm in args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"--arms: unknown arm '{arm}' (known: {', '.join(ARMS)})")
        if reason := skip_reason(ARMS[arm][0]):
            print(f"skipping {arm}: {reason}")
            skipped[arm] = reason
        else:
            arms.append(arm)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"cpu native bf16: {native_bf16_cpu()}; torch {torch.__version__}; threads {args.threads}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("throughput_quick.json" if args.quick else "throughput.json")
    rows = []
    for model in args.models.split(","):
        for device in ("cuda", "cpu"):  # GPU and CPU arms apart, each at its own size; the GPU first
            these = [a for a in arms if ARMS[a][0] == device]
            if these:
                rows += bench_model(model, these, "quick" if args.quick else device, args.quick, repeats, args.steps,
                                    args.clients)
                # written after every group: a run stopped by its time limit keeps what it measured
                write_json(path, {"rows": rows, "skipped": skipped, "torch": torch.__version__,
                                  "cpu_native_bf16": native_bf16_cpu(), "threads": args.threads})
    print("| model | arm | batch × len | clients × steps | round s | steps/s | vs fp32 | vs K=1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['arm']} | {r['batch']}×{r['length']} | {r['clients']}×"
              f"{r['steps_per_round'] // r['clients']} | {r['round_s']:.3f} | {r['steps_per_s']:.2f} | "
              f"{r['speedup_vs_fp32']}× | {r['speedup_vs_k1']}× |")


if __name__ == "__main__":
    main()
