"""Building a run and measuring it, once, for both runtimes.

`Run(cfg)` loads the data this process may read (all of it in the simulation; on a Flower node its own
file; on a Flower server none but its own test set), tokenizes once, builds ONE base model with the
adapters injected, sets the method up and creates the server and every client's state. `evaluate`
measures the models as they are now (global test, each client on its own test and validation sets);
`summary` is summary.json. The in-process loop is `runtime/simulation.py`; Flower's is `runtime/flower/`.
"""

from __future__ import annotations

import logging
import random
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .adapters import detect_head, inject_adapters
from .compute import DTYPES, check_precision, resolve_device
from .config import ConfigError, RunConfig
from .data import (
    BatchStream,
    Examples,
    Split,
    Task,
    concat,
    split_task,
    stratified_sample,
    task_from_config,
    tokenize,
    tokenize_causal,
)
from .data.silo import Silo, config_silos, files_task, no_examples
from .evaluation import METRICS, combine, measure_client, measure_global, plan_evaluation, write_samples
from .federation import ClientState, Download, Server, apply_download
from .methods import MethodContext, get_method
from .metrics import resolve_metrics
from .models import cast_base, default_targets, load_causal_lm, load_classifier, load_tokenizer
from .seeding import rng, torch_generator
from .trackers import heatmap
from .train import evaluate, evaluate_lm, generate_answers, score_generations
from .vision.classifier import image_examples, load_image_classifier
from .vision.vlm import LM_TARGETS, VisionLanguage, load_vlm, tokenize_vlm

log = logging.getLogger("fedlora")


class Run:
    """One run built from its config: data, one base model with adapters, the method, the server and every
    client's state; and how it is measured (`evaluate`, `summary`). The runtimes drive it."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, silos: dict[int, Silo] | None = None,
                 label_names: list[str] | None = None, *, task: Task | None = None, split: Split | None = None,
                 model: torch.nn.Module | None = None, tokenizer=None, vlm: VisionLanguage | None = None):
        """`silos` (`partition.scheme: files` only): the clients whose own files this process reads (a Flower node:
        its own; a Flower server: none), default every client's `partition.files`; `label_names`: the run's label
        space, default task.labels or the union of the files' labels. `task`, `split`, `model` and `tokenizer`
        replace what `cfg` names (the Python API passes objects); `vlm` a vision-language model for an image task."""
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.output.dir) / cfg.name
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.device = resolve_device(cfg.device)  # before any loading: a missing GPU fails at once
        check_precision(cfg.precision, self.device)
        if cfg.model.quantization is not None and self.device.type != "cuda":
            raise ConfigError(f"model.quantization: {cfg.model.quantization}-bit needs a CUDA device (bitsandbytes); "
                              f"device '{cfg.device}' is {self.device.type} here")
        self.method = get_method(cfg.method.name)(cfg)

        # data: tokenized once; clients hold index subsets
        data_seed = cfg.split_seed
        self.files = cfg.partition.scheme == "files"
        if self.files:  # node-local data: each client's own file, nothing else
            local = config_silos(cfg) if silos is None else silos
            self.task, self.split = files_task(cfg, local, label_names, server_test=not silos)
            self.local_clients = sorted(local)
        else:
            self.task = task if task is not None else task_from_config(cfg.task, data_seed)
            self.split = split if split is not None else split_task(self.task, cfg.partition, data_seed)
            self.local_clients = list(range(cfg.partition.num_clients))
        # an image task with answers: a vision-language model (its tokenizer knows the image placeholder)
        self.vlm = vlm if vlm is not None else (
            load_vlm(cfg.model.name, cfg.seed) if self.task.images is not None and self.task.causal else None)
        self.image_classifier = None
        if self.vlm is not None:
            self.tokenizer = self.vlm.tokenizer
        elif self.task.images is not None:  # image classification: no text, no tokenizer
            self.image_classifier = load_image_classifier(cfg.model.name, self.task.num_labels, cfg.seed)
            self.tokenizer = None
        else:
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.name)
        if not self.task.texts:  # a server without a test set of its own
            everything = no_examples(self.task.causal)
        elif self.vlm is not None:
            everything = tokenize_vlm(self.vlm, self.task, cfg.model.max_length)
        elif self.image_classifier is not None:
            everything = image_examples(self.task, self.image_classifier)
        elif self.task.causal:
            everything = tokenize_causal(self.tokenizer, self.task.texts, self.task.targets, cfg.model.max_length)
        else:
            everything = tokenize(self.tokenizer, self.task.texts, self.task.labels, cfg.model.max_length)
        self.client_train = [everything.subset(tr) for tr, _ in self.split.clients]
        # evaluation sets: capped ones are seeded samples stratified by label (category for a causal LM), the
        # same rule on the test and the validation path, never a prefix of file order
        labels, e = np.asarray(self.task.labels), cfg.eval
        if e.split == "validation" and self.files:  # the clients' own validation; the server's test set stays
            held = self.split.validation
            global_pool = self.split.global_test
        elif e.split == "validation":  # tuning: the test splits are never touched
            held = self.split.validation
            global_pool = np.concatenate(held)  # the clients' validation sets pooled, then sampled
        else:
            held = [te for _, te in self.split.clients]
            global_pool = self.split.global_test
        g_idx = stratified_sample(global_pool, labels, e.max_global_examples, rng("eval_sample", data_seed, 0))
        c_idx = [stratified_sample(h, labels, e.max_client_examples, rng("eval_sample", data_seed, 1, cid))
                 for cid, h in enumerate(held)]
        self.global_test = everything.subset(g_idx)
        self.client_test = [everything.subset(i) for i in c_idx]
        # causal LM: the prompts answered by greedy generation, a seeded sample of each evaluation set
        n_gen = e.generate_examples
        self.global_prompts = everything.subset(
            stratified_sample(g_idx, labels, n_gen, rng("eval_sample", data_seed, 2)))
        self.client_prompts = [
            everything.subset(stratified_sample(i, labels, n_gen, rng("eval_sample", data_seed, 3, c)))
            for c, i in enumerate(c_idx)]
        # validation sets scored beside test, so that the summary's best round is chosen on them, never on test
        self.client_val = [
            everything.subset(stratified_sample(v, labels, e.max_client_examples, rng("eval_sample", data_seed, 4, c)))
            for c, v in enumerate(self.split.validation)] if e.split == "test" and self.split.validation else None
        self.metric_fns = resolve_metrics(cfg.eval.metrics)
        self.metric_names = METRICS + tuple(n for n, _ in self.metric_fns)
        self.num_clients = cfg.partition.num_clients

        # one base model, adapters injected once
        a, dtype = cfg.adapter, DTYPES[cfg.model.dtype]
        if model is None and self.vlm is not None:
            model = self.vlm.model
        elif model is None and self.image_classifier is not None:
            model = self.image_classifier.model
        elif model is None and self.task.causal:
            model = load_causal_lm(cfg.model.name, cfg.seed, dtype, cfg.model.quantization, self.device)
        elif model is None and cfg.model.quantization is not None:
            raise ConfigError(f"model.quantization is for causal LMs; task '{self.task.name}' is a classification task")
        elif model is None:
            model = load_classifier(cfg.model.name, self.task.num_labels, cfg.seed)
            cast_base(model, dtype, keep=detect_head(model) if a.head_modules is None else a.head_modules)
        if cfg.model.quantization is None:  # a quantized model was placed by bitsandbytes while loading
            model.to(self.device)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # heterogeneous ranks: layers at the largest rank, the scale alpha / adapter.r on every client
        # a VLM: adapters on its language model, its projector the trained "head" factor (method.head: shared /
        # personal; adapter.head_modules: [] freezes it), the vision tower frozen
        targets = a.target_modules or (LM_TARGETS if self.vlm is not None else default_targets(model))
        heads = a.head_modules if a.head_modules is not None or self.vlm is None else [self.vlm.projector]
        self.am = inject_adapters(model, targets if isinstance(targets, list) else [targets], max(self.method.ranks),
                                  a.alpha, a.dropout, tri=self.method.tri, head_modules=heads, scale=a.alpha / a.r,
                                  full_update=self.method.full_update, dual=self.method.dual,
                                  generator=torch_generator("adapter_init", cfg.seed, 1))
        self.am.precision = cfg.precision
        labels = np.asarray(self.task.labels, dtype=np.int64)  # the method sees these facts, never the Run
        self.method.setup(MethodContext(self.am, cfg.seed, self.run_dir, self.task.num_labels,
                                        [labels[tr] for tr, _ in self.split.clients], self.method.opt))
        self.init_state = self.am.get_state()

        # trainers: one per client, or one pooled trainer for the centralized reference (the one place that
        # decides pooling: everything else follows from the number of trainers)
        self.train_sets: list[Examples] = [concat(self.client_train)] if self.method.pooled else self.client_train
        self.server = Server(self.method, self.init_state, cfg.federation, len(self.train_sets), cfg.seed)
        self.clients: dict[int, ClientState] = {
            cid: self.server.initial_client_state(self.init_state, cid) for cid in range(len(self.train_sets))}
        self.streams = [BatchStream(len(d), cfg.train.batch_size, cfg.seed, cid)
                        for cid, d in enumerate(self.train_sets)]
        self.dropout_rng = rng("dropout", cfg.seed)
        self.history: list[dict] = []

    def client_classes(self, cid: int) -> torch.Tensor:
        """One class per training example of client `cid` (a causal LM task: its category)."""
        return torch.as_tensor(np.asarray(self.task.labels, dtype=np.int64)[self.split.clients[cid][0]])

    def send_descriptor(self, cid: int, t: int) -> None:
        """A client's first contact (CE-LoRA): it computes its data descriptor and sends it before its download."""
        if self.method.needs_descriptor(self.server, cid):
            desc = self.method.client_descriptor(self.am, self.client_train[cid], self.client_classes(cid), cid)
            self.method.receive_descriptor(self.server, cid, desc, t)

    # ---- evaluation ----
    def trainers(self) -> list[int]:
        """The ids of the trainers: every client, or the one pooled trainer of the centralized reference."""
        return list(range(len(self.train_sets)))

    def trainer_of(self, cid: int) -> int:
        return cid if len(self.train_sets) == self.num_clients else 0

    def eval_state(self, cid: int) -> dict[str, torch.Tensor]:
        """Client `cid`'s model now: its state with the download it would receive applied."""
        trainer = self.trainer_of(cid)
        t = self.server.last_round + 1
        dl = self.method.download(self.server, trainer, t)
        return apply_download(self.clients[trainer], Download(trainer, t, dl), self.method).full()

    def single_model(self) -> bool:
        """One model for every client: a pooled trainer, or no client keeps anything of its own."""
        return len(self.train_sets) < self.num_clients or all(not s.personal for s in self.clients.values())

    def measure(self, data: Examples, generate: bool, samples: list | None = None,
                prompts: Examples | None = None) -> dict:
        """The task's metrics of the model as it is now on `data` (and greedy answers to `prompts`, for a causal LM)."""
        bs = self.cfg.eval.batch_size
        if not self.task.causal:
            return evaluate(self.am, data, bs, self.metric_fns)
        m = evaluate_lm(self.am, data, bs)
        if generate and prompts is not None:
            gen = generate_answers(self.am, self.tokenizer, prompts, self.cfg.eval.max_new_tokens)
            for g in gen:  # a VLM's answers name their image (the report draws them)
                if "image_slot" in g:
                    g["image"] = self.image_files[g.pop("image_slot")]
            m |= score_generations(gen)
            refs, answers = [s["reference"] for s in gen], [s["answer"] for s in gen]
            m |= {name: float(fn(refs, answers)) for name, fn in self.metric_fns}
            if samples is not None:
                samples.extend(gen)
        return m

    @cached_property
    def image_files(self) -> list:
        """The image of each slot of the decoded image store (first-occurrence order, as `decode_images` fills it);
        an in-memory image (a dataset's Image feature) is named by its path or its slot."""
        seen = dict.fromkeys(p if isinstance(p, str) else (p.get("path") or f"#{i}") for i, p in
                             enumerate(self.task.images or []))
        return list(seen)

    @cached_property
    def eval_order(self) -> np.ndarray:
        """One seeded order of the clients for both evaluation subsets (global test, own test): the subsets
        are prefixes of it, so they overlap and fewer models are evaluated."""
        return rng("eval_clients", self.cfg.split_seed).permutation(self.num_clients)

    def global_eval_clients(self) -> set[int]:
        """The fixed seeded subset of clients whose own models are also measured on the global test set."""
        k = self.cfg.eval.global_clients or self.num_clients
        return set(self.eval_order[:k].tolist())

    def eval_clients(self) -> list[int]:
        """The clients measured on their own test sets: a fixed seeded subset of `eval.clients` (None: all),
        plus with `eval.participants` the clients of the round just aggregated."""
        n, k = self.num_clients, self.cfg.eval.clients
        if k is None or k >= n:
            return list(range(n))
        chosen = set(self.eval_order[:k].tolist())
        if self.cfg.eval.participants:
            chosen |= set(self.server.participants)
        return sorted(chosen)

    def has_global_test(self) -> bool:
        """A global test set to measure on: node-local data has only the server's own, for a single global model
        (personal models stay on their clients); otherwise global metrics are the clients' reports, weighted."""
        return len(self.global_test) > 0 and (not self.files or self.single_model())

    def evaluate(self, generate: bool = False) -> dict:
        """The evaluation plan run in this process (`fedlora.evaluation`); `generate`: also greedy answers for a
        causal LM (costly)."""
        plan = plan_evaluation(self, generate)
        g, g_samples = None, None
        if plan.global_source == "server":
            self.am.set_state(self.eval_state(0))
            g, g_samples = measure_global(self, plan.generate)
        results, loaded = {}, g is not None
        for cid, task in plan.clients.items():
            if not (plan.single and loaded):  # one model for every client is loaded once
                self.am.set_state(self.eval_state(cid))
                loaded = True
            results[cid] = measure_client(self, cid, task, plan.generate)
        row, samples = combine(self, plan, g, results, g_samples)
        if plan.generate:
            write_samples(self.run_dir, self.server.last_round, samples)
        return row

    # ---- checkpoints: the run's part (every runtime adds its own) ----
    def snapshot(self) -> dict:
        return {"round": len(self.history), "history": self.history, "server": self.server.state_dict(),
                "rng": {"dropout": self.dropout_rng.bit_generator.state}}

    def restore(self, ck: dict) -> None:
        self.server.load_state_dict(ck["server"])
        self.dropout_rng.bit_generator.state = ck["rng"]["dropout"]
        self.history = ck["history"]

    def weights_image(self, t: int):
        """CE-LoRA's round-t mixing weights as a heatmap image (None for other methods)."""
        lw = getattr(self.method, "last_weights", None)
        if not lw or lw.get("round") != t:
            return None
        return heatmap(np.asarray(lw["weights"]), list(lw["clients"]), f"CE-LoRA weights, round {t}")

    def adapter_meta(self) -> dict:
        """adapter_meta.json: what a reader needs to rebuild the adapters."""
        return {"targets": self.am.targets, "head_modules": self.am.head_modules, "r": self.cfg.adapter.r,
                "alpha": self.am.alpha, "scale": self.am.scale, "client_ranks": self.method.ranks,
                "tri": self.am.tri, "model": self.cfg.model.name,
                "num_labels": self.task.num_labels, "label_names": self.task.label_names,
                "num_clients": self.num_clients, "method": self.method.name,
                "task_type": "CAUSAL_LM" if self.task.causal else "SEQ_CLS",
                **({"vlm": True, "image_size": self.vlm.image_size} if self.vlm is not None else {})}
