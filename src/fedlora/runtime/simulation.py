"""In-process simulation: one process, ONE base model, every client's adapter state swapped in and out.

Per round: sample clients -> each downloads, trains, uploads -> the server validates and
aggregates -> evaluation -> one line in `metrics.jsonl`. Memory grows with the clients' adapter
states only (server-held tensors are shared by reference, never copied per client).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..adapters import inject_adapters
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import RunConfig, dump_config
from ..data import BatchStream, Examples, concat, load_task, split_task, tokenize, tokenize_causal
from ..data.silo import Silo, config_silos, files_task, no_examples
from ..federation import ClientState, Download, Server, Upload, apply_download, client_fit
from ..methods import get_method
from ..models import default_targets, load_causal_lm, load_classifier, load_tokenizer
from ..train import evaluate, evaluate_lm, generate_answers, score_generations

log = logging.getLogger("fedlora")


METRICS = ("accuracy", "macro_f1", "loss", "perplexity", "rouge_l", "exact_match")


def evaluation_row(g: dict, per_client: list[dict]) -> dict:
    """The evaluation columns of a metrics row: global-test metrics `g`, per-client metrics on their own test.

    Classification has accuracy / macro-F1 / loss; a causal LM loss / perplexity and, when answers were
    generated, ROUGE-L / exact match. Personal metrics are unweighted means over clients."""
    row = {f"global_{k}": float(g[k]) for k in METRICS if k in g}
    for k in METRICS:
        if k in per_client[0]:
            row[f"personal_{k}"] = float(np.mean([m[k] for m in per_client]))
    if "accuracy" in per_client[0]:
        n = np.array([m["n"] for m in per_client], dtype=float)
        acc = np.array([m["accuracy"] for m in per_client])
        row |= {"personal_accuracy_weighted": float((acc * n).sum() / n.sum()),
                "personal_accuracy_std": float(acc.std()), "client_accuracy": [round(float(a), 4) for a in acc]}
    else:
        row["client_perplexity"] = [round(float(m["perplexity"]), 3) for m in per_client]
    return row


def weighted_metrics(per_client: list[dict]) -> dict:
    """The example-weighted aggregate of the clients' metrics (the global metrics when no global test set exists)."""
    n = np.array([m["n"] for m in per_client], dtype=float)
    return {k: float((np.array([m[k] for m in per_client]) * n).sum() / n.sum()) for k in METRICS if k in per_client[0]}


class Simulation:
    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, silos: dict[int, Silo] | None = None,
                 label_names: list[str] | None = None):
        """`silos` (`partition.scheme: files` only): the clients whose own files this process reads (a Flower node:
        its own; a Flower server: none), default every client's `partition.files`; `label_names`: the run's label
        space, default task.labels or the union of the files' labels."""
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.output.dir) / cfg.name
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.method = get_method(cfg.method.name)(cfg)

        # data: tokenized once; clients hold index subsets
        t = cfg.task
        self.files = cfg.partition.scheme == "files"
        if self.files:  # node-local data: each client's own file, nothing else
            local = config_silos(cfg) if silos is None else silos
            self.task, self.split = files_task(cfg, local, label_names, server_test=not silos)
            self.local_clients = sorted(local)
        else:
            self.task = load_task(t.name, path=t.path, text_column=t.text_column, label_column=t.label_column,
                                  max_examples=t.max_examples, max_per_class=t.max_per_class, seed=cfg.seed,
                                  keep_labels=t.keep_labels)
            self.split = split_task(self.task, cfg.partition, cfg.seed)
            self.local_clients = list(range(cfg.partition.num_clients))
        self.tokenizer = load_tokenizer(cfg.model.name)
        if not self.task.texts:  # a server without a test set of its own
            everything = no_examples(self.task.causal)
        elif self.task.causal:
            everything = tokenize_causal(self.tokenizer, self.task.texts, self.task.targets, cfg.model.max_length)
        else:
            everything = tokenize(self.tokenizer, self.task.texts, self.task.labels, cfg.model.max_length)
        self.client_train = [everything.subset(tr) for tr, _ in self.split.clients]
        if cfg.eval.split == "validation" and self.files:  # the clients' own validation; the server's test set stays
            held = self.split.validation
            self.global_test = everything.subset(self.split.global_test).head(cfg.eval.max_global_examples)
        elif cfg.eval.split == "validation":  # tuning: the test splits are never touched
            held = self.split.validation
            pooled = np.concatenate(held)  # a seeded sample, not the first clients' validation sets
            pooled = np.sort(np.random.default_rng([cfg.seed, 103]).permutation(pooled)[:cfg.eval.max_global_examples])
            self.global_test = everything.subset(pooled)
        else:
            held = [te for _, te in self.split.clients]
            self.global_test = everything.subset(self.split.global_test).head(cfg.eval.max_global_examples)
        self.client_test = [everything.subset(te).head(cfg.eval.max_client_examples) for te in held]
        self.num_clients = cfg.partition.num_clients

        # one base model, adapters injected once
        if self.task.causal:
            model = load_causal_lm(cfg.model.name, cfg.seed)
        else:
            model = load_classifier(cfg.model.name, self.task.num_labels, cfg.seed)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        a = cfg.adapter
        self.am = inject_adapters(model, a.target_modules or default_targets(model), a.r, a.alpha, a.dropout,
                                  tri=self.method.tri, head_modules=a.head_modules)
        self.method.setup(self)
        self.init_state = self.am.get_state()

        # trainers: one per client, or one pooled trainer for the centralized reference
        self.train_sets: list[Examples] = [concat(self.client_train)] if self.method.pooled else self.client_train
        self.server = Server(self.method, self.init_state, cfg.federation, len(self.train_sets), cfg.seed)
        self.clients: dict[int, ClientState] = {
            cid: self.server.initial_client_state(self.init_state) for cid in range(len(self.train_sets))}
        self.streams = [BatchStream(len(d), cfg.train.batch_size, cfg.seed, cid)
                        for cid, d in enumerate(self.train_sets)]
        self.dropout_rng = np.random.default_rng([cfg.seed, 102])
        self.history: list[dict] = []

    # ---- one round ----
    def run_round(self, t: int) -> dict:
        start = time.perf_counter()
        cids = [0] if self.method.pooled else self.server.sample()
        for cid in cids:
            self.send_descriptor(cid, t)
        downloads = {cid: self.server.download(cid, t) for cid in cids}
        uploads: dict[int, Upload | None] = {}
        for cid, dl in downloads.items():  # the in-process "transport": clients run one after another
            if self.cfg.federation.dropout_rate and self.dropout_rng.random() < self.cfg.federation.dropout_rate:
                self.clients[cid] = apply_download(self.clients[cid], dl)  # received, then vanished
                uploads[cid] = None
                continue
            uploads[cid], self.clients[cid] = client_fit(self.am, self.method, self.clients[cid], dl,
                                                         self.train_sets[cid], self.streams[cid], self.cfg.train)
        row = self.server.finish_round(t, downloads, uploads)
        if t % self.cfg.eval.every == 0 or t == self.cfg.federation.rounds:
            row |= self.evaluate(generate=t == self.cfg.federation.rounds)
        row["wall_s"] = time.perf_counter() - start
        return row

    def client_classes(self, cid: int) -> torch.Tensor:
        """One class per training example of client `cid` (a causal LM task: its category)."""
        return torch.as_tensor(np.asarray(self.task.labels, dtype=np.int64)[self.split.clients[cid][0]])

    def send_descriptor(self, cid: int, t: int) -> None:
        """A client's first contact (CE-LoRA): it computes its data descriptor and sends it before its download."""
        if self.method.needs_descriptor(self.server, cid):
            desc = self.method.client_descriptor(self.am, self.client_train[cid], self.client_classes(cid), cid)
            self.method.receive_descriptor(self.server, cid, desc, t)

    # ---- evaluation ----
    def eval_state(self, cid: int) -> dict[str, torch.Tensor]:
        """Client `cid`'s model now: its state with the download it would receive applied."""
        state = self.clients[0 if self.method.pooled else cid]
        t = self.server.last_round + 1
        dl = {} if self.method.pooled else self.method.download(self.server, cid, t)
        return apply_download(state, Download(cid, t, dl)).full()

    def single_model(self) -> bool:
        return self.method.pooled or all(not s.personal for s in self.clients.values())

    def measure(self, data: Examples, generate: bool, samples: list | None = None) -> dict:
        """The task's metrics of the model as it is now on `data` (and generated answers, for a causal LM)."""
        bs = self.cfg.eval.batch_size
        if not self.task.causal:
            return evaluate(self.am, data, bs)
        m = evaluate_lm(self.am, data, bs)
        if generate:
            gen = generate_answers(self.am, self.tokenizer, data.head(self.cfg.eval.generate_examples),
                                   self.cfg.eval.max_new_tokens)
            m |= score_generations(gen)
            if samples is not None:
                samples.extend(gen)
        return m

    def global_eval_clients(self) -> set[int]:
        """The fixed seeded subset of clients whose own models are also measured on the global test set."""
        k = self.cfg.eval.global_clients or self.num_clients
        return set(np.random.default_rng([self.cfg.seed, 103]).permutation(self.num_clients)[:k].tolist())

    def has_global_test(self) -> bool:
        """A global test set to measure on: node-local data has only the server's own, for a single global model
        (personal models stay on their clients); otherwise global metrics are the clients' reports, weighted."""
        return len(self.global_test) > 0 and (not self.files or self.single_model())

    def evaluate(self, generate: bool = False) -> dict:
        """Global-test and per-client metrics; `generate`: also greedy answers for a causal LM (costly)."""
        generate = generate and self.task.causal and self.cfg.eval.generate_examples > 0
        samples: dict[str, list] = {}
        if not self.has_global_test():
            per_client = []
            for cid in range(self.num_clients):
                self.am.set_state(self.eval_state(cid))
                own = samples.setdefault(f"client_{cid}", [])
                per_client.append(self.measure(self.client_test[cid], generate, own))
            g = weighted_metrics(per_client)
        elif self.single_model():
            self.am.set_state(self.eval_state(0))
            g = self.measure(self.global_test, generate, samples.setdefault("global", []))
            per_client = [self.measure(d, generate, samples.setdefault(f"client_{c}", []))
                          for c, d in enumerate(self.client_test)]
        else:
            per_client, gs = [], []
            global_cids = self.global_eval_clients()
            for cid in range(self.num_clients):
                self.am.set_state(self.eval_state(cid))
                own = samples.setdefault(f"client_{cid}", [])
                per_client.append(self.measure(self.client_test[cid], generate, own))
                if cid in global_cids:
                    gs.append(self.measure(self.global_test, generate, samples.setdefault(f"global_by_{cid}", [])))
            g = {k: float(np.mean([x[k] for x in gs])) for k in gs[0] if k in METRICS}
        if generate:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / f"samples_round_{self.server.last_round}.jsonl", "w") as f:
                for who, rows in samples.items():
                    for r in rows[:3]:  # a few per model is enough to read
                        f.write(json.dumps({"model": who, **r}) + "\n")
        return evaluation_row(g, per_client)

    # ---- checkpoints: everything a bit-identical resume needs ----
    def snapshot(self) -> dict:
        server = self.server
        clients = {}
        for cid, st in self.clients.items():
            # a shared tensor that IS the server's current one is stored once, as a reference
            shared = {k: (None if v is server.global_state.get(k) else v) for k, v in st.shared.items()}
            clients[cid] = {"shared": shared, "personal": st.personal}
        return {
            "round": len(self.history), "history": self.history, "server": server.state_dict(),
            "clients": clients, "streams": [s.state() for s in self.streams],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "dropout": self.dropout_rng.bit_generator.state},
        }

    def restore(self, ck: dict) -> None:
        server = self.server
        server.load_state_dict(ck["server"])
        self.clients = {
            cid: ClientState({k: (server.global_state[k] if v is None else v) for k, v in c["shared"].items()},
                             c["personal"]) for cid, c in ck["clients"].items()}
        for stream, state in zip(self.streams, ck["streams"], strict=True):
            stream.load(state)
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        self.dropout_rng.bit_generator.state = ck["rng"]["dropout"]
        self.history = ck["history"]

    # ---- the whole run ----
    def run(self, on_round: Callable[[dict], None] | None = None, resume: bool = False) -> dict:
        """Run every round; with `resume`, continue after the last complete checkpointed round."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        self.write_adapter_meta()
        ck = load_checkpoint(self.run_dir) if resume else None
        if ck is not None:
            self.restore(ck)
            log.info("resuming %s after round %d", self.run_dir, ck["round"])
        baseline_path = self.run_dir / "baseline.json"
        if self.cfg.eval.baseline and not baseline_path.is_file():  # the base model (ΔW = 0) before round 1
            baseline_path.write_text(json.dumps(self.evaluate()))
        with open(self.run_dir / "metrics.jsonl", "w") as f:
            for row in self.history:  # rows of rounds after the checkpoint (if any) are dropped
                f.write(json.dumps(row) + "\n")
            for t in range(len(self.history) + 1, self.cfg.federation.rounds + 1):
                row = self.run_round(t)
                self.history.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                save_checkpoint(self.run_dir, self.snapshot())
                if on_round:
                    on_round(row)
        summary = self.summary(sum(r["wall_s"] for r in self.history))
        if baseline_path.is_file():
            summary["baseline"] = json.loads(baseline_path.read_text())
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.cfg.output.save_client_states:
            self.save_states()
        return summary

    def summary(self, wall: float) -> dict:
        last = next((r for r in reversed(self.history) if "global_loss" in r), {})
        rounds = len(self.history)
        per_client_round = [r["up_raw_adapter_per_client"] for r in self.history]
        final = {f"{w}_{k}": last.get(f"{w}_{k}") for w in ("global", "personal") for k in METRICS
                 if f"{w}_{k}" in last}
        final |= {k: last[k] for k in ("client_accuracy", "client_perplexity") if k in last}
        return {"name": self.cfg.name, "method": self.method.name, "head": self.method.head,
                "task": self.task.name, "num_clients": self.num_clients, "rounds": rounds,
                "global_accuracy": None, "personal_accuracy": None,  # None for a causal LM; set below otherwise
                **final, "personal_accuracy_weighted": last.get("personal_accuracy_weighted"),
                "up_raw_adapter_per_client_round": float(np.mean(per_client_round)) if per_client_round else 0.0,
                **self.server.cumulative, "wall_s": wall}

    def write_adapter_meta(self) -> None:
        meta = {"targets": self.am.targets, "head_modules": self.am.head_modules, "r": self.am.r,
                "alpha": self.am.alpha, "tri": self.am.tri, "model": self.cfg.model.name,
                "num_labels": self.task.num_labels, "label_names": self.task.label_names,
                "num_clients": self.num_clients, "method": self.method.name,
                "task_type": "CAUSAL_LM" if self.task.causal else "SEQ_CLS"}
        (self.run_dir / "adapter_meta.json").write_text(json.dumps(meta, indent=2))

    def save_states(self) -> None:
        """Each client's model state and the server's global tensors, as safetensors."""
        d = self.run_dir / "states"
        d.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.server.global_state.items()} or {}, str(d / "server.safetensors"))
        if self.single_model():
            save_file(self.eval_state(0), str(d / "global.safetensors"))
        for cid in range(self.num_clients):
            state = {k: v.contiguous() for k, v in self.eval_state(cid).items()}
            save_file(state, str(d / f"client_{cid}.safetensors"))
