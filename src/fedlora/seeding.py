"""One random generator per purpose, derived from (seed, purpose name, ids) and nothing else.

Every random draw in a run names its purpose, so that two purposes never share a stream and a
client id can never be mistaken for a purpose: the key handed to `numpy.random.SeedSequence` is
(crc32 of the purpose name, number of ids, *ids), its length included, so (seed, "split", 1) and
(seed, "split", 1, 0) differ. Changing `seed` changes every training stream; the split streams
take the run's `data_seed` (default: `seed`), so seeds can vary training on a fixed split.

    rng("batch_order", seed, client, epoch)          # numpy Generator
    torch_generator("adapter_init", seed)            # torch.Generator (CPU)
    torch_seed("train_noise", seed, client, round)   # an int, for torch.manual_seed in a forked RNG
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

# purposes in use; a new one is added here so that a typo is an error, not a fresh stream
PURPOSES = frozenset({
    "task_sample",       # max_examples / max_per_class subsampling of a task
    "split",             # the global held-out set and the partitioner's own seed
    "client_split",      # each client's train / test carve
    "client_val",        # each client's validation carve from its train part
    "eval_sample",       # capped evaluation sets (global and per client) and generation prompts
    "eval_clients",      # which clients' models are also measured on the global test set
    "batch_order",       # each client's epoch permutations
    "adapter_init",      # A (LoRA) and random orthonormal A, B (tri-LoRA), the head
    "sampling",          # which clients take part in a round
    "dropout",           # which sampled clients fail to return
    "train_noise",       # the base model's dropout during local training
    "pass_noise",        # the same, for a batched pass of several clients (one stream per pass)
    "dp_noise",          # local / central DP noise on uploads
    "descriptor_noise",  # CE-LoRA's private data-descriptor release
    "client_ranks",      # heterogeneous ranks: which client gets which rank
    "attack",            # the gradient-inversion attack: dummy initialisations and search proposals
    "attack_baseline",   # the random-token guess the attack is compared with
    "bootstrap",         # confidence intervals of benchmark means by bootstrap resampling
    "secagg_graph",      # secure aggregation: which clients are neighbours (share keys and masks) in a round
    "secagg_rounding",   # secure aggregation: a client's stochastic rounding into the quantized field
})


def seed_sequence(purpose: str, seed: int, *ids: int) -> np.random.SeedSequence:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random purpose '{purpose}' (known: {', '.join(sorted(PURPOSES))})")
    if any(int(i) < 0 for i in ids) or int(seed) < 0:
        raise ValueError(f"seed and ids must be non-negative, got seed={seed} ids={ids}")
    key = (zlib.crc32(purpose.encode()), len(ids), *(int(i) for i in ids))
    return np.random.SeedSequence(entropy=int(seed), spawn_key=key)


def rng(purpose: str, seed: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng(seed_sequence(purpose, seed, *ids))


def torch_seed(purpose: str, seed: int, *ids: int) -> int:
    return int(seed_sequence(purpose, seed, *ids).generate_state(1, dtype=np.uint64)[0] >> 1)


def torch_generator(purpose: str, seed: int, *ids: int) -> torch.Generator:
    return torch.Generator().manual_seed(torch_seed(purpose, seed, *ids))
