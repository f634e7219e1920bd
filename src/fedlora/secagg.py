"""Secure aggregation (SecAgg+, Bell et al., CCS 2020), transport-free: the server learns Σ_i n_i x_i over
the round's surviving clients and nothing about one x_i.

The four stages of Flower's SecAgg+ (`flwr.client.mod.secaggplus_mod`), run over any transport:

    0 setup        each client makes two ECDH key pairs (pk1: pairwise masks, pk2: encrypting its shares)
                   and sends the public halves
    1 share keys   the server sends each client its neighbours' public keys; the client draws a private
                   mask seed b, splits b and sk1 into Shamir shares (threshold t), and sends each
                   neighbour its shares, encrypted with their ECDH + HKDF shared key (Fernet)
    2 masked       the server forwards the encrypted shares; each client trains, checks and clips its
                   upload, quantizes it, folds its example count in (`factor_combine`), and adds masks
                   in Z_{2^64}: PRG(b) + Σ_{j<i} PRG(s_ij) − Σ_{j>i} PRG(s_ij), s_ij = ECDH(sk1_i, pk1_j)
    3 unmask       the server names the survivors and the dropped; each survivor sends its shares of the
                   survivors' b and of the dropped clients' sk1; with t shares of each, the server removes
                   every mask and is left with the sum. Fewer than t: the round is skipped, never unmasked
                   in part.

Flower's primitives do the cryptography (`flwr.common.secure_aggregation`: ECDH key pairs, HKDF shared
keys, Fernet, Shamir over GF(2^128), quantization, `factor_combine` / `factor_extract`). Masks are NOT
drawn with Flower's `pseudo_rand_gen` (it folds the seed to 32 bits and uses NumPy's Mersenne twister):
a mask is the ChaCha20 keystream keyed by SHA-256 of the 32-byte secret, read as uint64 (`mask`).

The field is Z_{2^64} (uint64 arithmetic wraps by itself), so each coordinate costs 8 bytes on the wire.
A value x in [−c, c] is stochastically rounded to q in {0, …, T}, T = 2^bits, step 2c / T; client i sends
n_i q_i and n_i, so the server recovers Σ n_i q_i / Σ n_i: the example-weighted mean within one step.
Nothing here moves a message: the simulation calls these stages in process, the Flower runtime sends them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from .adapters import factor_of
from .config import FederationConfig
from .ranks import pad
from .seeding import rng

WEIGHT = "secagg/weight"  # the folded-in example count, the first array of the masked vector (`factor_combine`)
UP = ("keys", "shares", "masked", "unmask")  # the protocol's byte columns: up_secagg_<stage>, down_secagg_<stage>
ID_BYTES = 8  # a client id in a list the server sends (stage 3)


def layout(names: object) -> list[str]:
    """The order in which a masked vector's arrays are masked and summed: the folded-in weight first, then the
    keys sorted. Both ends derive it from the names alone, never from the order a transport hands a dict back in
    (a safetensors blob is decoded in no fixed order)."""
    return [WEIGHT, *sorted(k for k in names if k != WEIGHT)]


class SecAggError(ValueError):
    """A protocol violation seen by a client (it refuses to go on) or a round that cannot be unmasked."""


@dataclass(frozen=True)
class SecAggParams:
    """The protocol's parameters for a round, from `federation.secagg_*`."""

    threshold: float  # a fraction of each client's group (itself and its neighbours); at least 2 shares
    neighbours: int | None  # SecAgg+'s graph: each client shares with k others; None: all (SecAgg)
    clip_range: float  # c: values are clipped to [−c, c] before quantization
    bits: int  # T = 2^bits quantization levels over [−c, c]
    seed: int  # the run's seed: the neighbour graph and the stochastic rounding are reproducible

    @classmethod
    def from_config(cls, fed: FederationConfig, seed: int) -> SecAggParams:
        return cls(fed.secagg_threshold, fed.secagg_neighbours, fed.secagg_clip_range, fed.secagg_quantization_bits,
                   seed)

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def step(self) -> float:
        """The quantization step 2c / T: the unmasked mean is within one step of the plain mean (of clipped values)."""
        return 2 * self.clip_range / self.levels

    def group(self, m: int) -> int:
        """Shares each secret is split into: the client and its neighbours."""
        return m if self.neighbours is None else min(m, self.neighbours + 1)

    def min_shares(self, m: int) -> int:
        """t: shares needed to reconstruct a secret (and live neighbours needed to unmask)."""
        return min(self.group(m), max(2, math.ceil(self.threshold * self.group(m))))


def neighbour_graph(cids: list[int], params: SecAggParams, t: int) -> dict[int, list[int]]:
    """SecAgg+'s graph, as Flower builds it: the clients on a seeded random ring, each with the k/2 on either
    side (itself included); with `neighbours` None, every client of the round."""
    m = len(cids)
    order = [cids[i] for i in rng("secagg_graph", params.seed, t).permutation(m)]
    half = (params.group(m) - 1) // 2
    if params.group(m) >= m:
        return {c: sorted(cids) for c in cids}
    return {c: sorted({order[(i + o) % m] for o in range(-half, half + 1)}) for i, c in enumerate(order)}


def mask(secret: bytes, sizes: list[int]) -> list[np.ndarray]:
    """Uniform uint64 vectors from a cryptographic generator keyed by `secret`: the ChaCha20 keystream under
    key SHA-256(secret), read little-endian."""
    key = hashlib.sha256(b"fedlora-secagg-mask" + secret).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    flat = np.frombuffer(stream.update(bytes(8 * sum(sizes))), dtype="<u8").astype(np.uint64)
    return np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []


def upload_vector(tensors: dict[str, torch.Tensor], spec: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The upload as the float64 arrays that are summed: every key of `spec` ({key: (shape, dtype)}), in sorted
    order; a factor below the spec's rank zero-padded to it (HetLoRA's zero-padded sums)."""
    out = {}
    for k in sorted(spec):
        shape, v = tuple(spec[k][0]), tensors[k]
        if tuple(v.shape) != shape:
            v = pad(v, k, shape[0] if k.endswith(".A") else shape[1])
        out[k] = v.detach().to("cpu", torch.float64).numpy()
    return out


# ---------------------------------------------------------------- the client


@dataclass
class SecAggClient:
    """One client's side of one round; its state is plain bytes and ints (`state` / `from_state`), so a
    Flower SuperNode can keep it in `context.state` between the stage messages."""

    cid: int
    t: int
    params: SecAggParams
    sk1: bytes = b""
    sk2: bytes = b""
    pk1: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""  # b, the private mask seed
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # neighbour -> (pk1, pk2), self included
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> my share of its b
    sk1_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> my share of its sk1
    masked_with: list[int] = field(default_factory=list)  # neighbours whose shares arrived: pairwise masks
    unmasked: bool = False  # stage 3 answered once; never again (it would reveal b and sk1 of one client)
    t_min: int = 0  # the threshold, fixed in stage 1
    m: int = 0  # the round's clients: the sum of at most m vectors must not wrap around the field

    # stage 0
    def setup(self) -> tuple[bytes, bytes]:
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self.sk1, self.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
        self.sk2, self.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        return self.pk1, self.pk2

    # stage 1
    def share_keys(self, keys: dict[int, tuple[bytes, bytes]], m: int) -> dict[int, bytes]:
        """Encrypted shares of b and sk1 for each neighbour (`keys`: the neighbours' public keys, self included;
        `m`: the round's clients, which fix the threshold)."""
        t_min, self.m = self.params.min_shares(m), m
        self.t_min = t_min
        if len(keys) < t_min:
            raise SecAggError(f"client {self.cid}: {len(keys)} neighbours with keys < threshold {t_min}")
        if keys.get(self.cid) != (self.pk1, self.pk2):
            raise SecAggError(f"client {self.cid}: the server sent back other public keys for this client")
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise SecAggError(f"client {self.cid}: two neighbours sent the same public key")
        self.keys = dict(keys)
        self.seed = os.urandom(32)
        ids = sorted(keys)
        b_shares = create_shares(self.seed, t_min, len(ids))
        sk_shares = create_shares(self.sk1, t_min, len(ids))
        out = {}
        for i, nid in enumerate(ids):
            if nid == self.cid:
                self.seed_shares[nid], self.sk1_shares[nid] = b_shares[i], sk_shares[i]
                continue
            key = generate_shared_key(bytes_to_private_key(self.sk2), bytes_to_public_key(keys[nid][1]))
            out[nid] = encrypt(key, share_keys_plaintext_concat(self.cid, nid, b_shares[i], sk_shares[i]))
        return out

    # stage 2
    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        """Decrypt and keep the shares the neighbours sent this client; they are the ones masked with."""
        for src, ct in sorted(ciphertexts.items()):
            if src not in self.keys or src == self.cid:
                raise SecAggError(f"client {self.cid}: shares from {src}, not a neighbour")
            key = generate_shared_key(bytes_to_private_key(self.sk2), bytes_to_public_key(self.keys[src][1]))
            actual_src, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ct))
            if actual_src != src or dst != self.cid:
                raise SecAggError(f"client {self.cid}: a share from {actual_src} to {dst} arrived as {src} -> "
                                  f"{self.cid}")
            self.seed_shares[src], self.sk1_shares[src] = b_share, sk_share
        self.masked_with = sorted(ciphertexts)

    def masked_vector(self, vector: dict[str, np.ndarray], n_examples: int) -> dict[str, np.ndarray]:
        """Quantize, fold the example count in, add the masks: what the server receives (uint64 arrays)."""
        p = self.params
        if len(self.masked_with) + 1 < self.t_min or not self.seed:
            raise SecAggError(f"client {self.cid}: too few neighbours' shares to take part")
        if n_examples <= 0 or n_examples * p.levels * max(self.m, 1) >= 1 << 63:
            raise SecAggError(f"client {self.cid}: n_examples {n_examples} overflows the field at "
                              f"{p.bits} quantization bits")
        keys = layout(vector)[1:]
        # Flower's stochastic rounding draws from NumPy's global generator: seed it for this (client, round), so a
        # run is reproducible in process and on Flower, and restore it after
        saved = np.random.get_state()
        np.random.seed(int(rng("secagg_rounding", p.seed, self.cid, self.t).integers(2**32)))
        try:
            q = quantize([np.asarray(vector[k], dtype=np.float64) for k in keys], p.clip_range, p.levels)
        finally:
            np.random.set_state(saved)
        arrays = factor_combine(n_examples, [a.astype(np.uint64) * np.uint64(n_examples) for a in q])
        arrays = [np.asarray(a, dtype=np.uint64).reshape(-1) for a in arrays]
        sizes = [a.size for a in arrays]
        arrays = [a + m for a, m in zip(arrays, mask(self.seed, sizes), strict=True)]
        for nid in self.masked_with:
            shared = generate_shared_key(bytes_to_private_key(self.sk1), bytes_to_public_key(self.keys[nid][0]))
            pairwise = mask(shared, sizes)
            arrays = [(a + m) if self.cid > nid else (a - m) for a, m in zip(arrays, pairwise, strict=True)]
        shapes = [(1,), *[np.shape(vector[k]) for k in keys]]
        return {k: a.reshape(s) for k, a, s in zip([WEIGHT, *keys], arrays, shapes, strict=True)}

    # stage 3
    def unmask(self, active: list[int], dead: list[int]) -> dict[int, bytes]:
        """This client's shares of the survivors' b and the dropped clients' sk1, never both for one client."""
        if self.unmasked:
            raise SecAggError(f"client {self.cid}: asked to unmask twice in round {self.t}")
        if set(active) & set(dead):
            raise SecAggError(f"client {self.cid}: clients {sorted(set(active) & set(dead))} named both alive and "
                              f"dropped")
        if self.cid not in active:
            raise SecAggError(f"client {self.cid}: asked to unmask but not counted among the survivors")
        if len(set(active) & set(self.keys)) < self.t_min:
            raise SecAggError(f"client {self.cid}: fewer live neighbours than the threshold")
        self.unmasked = True
        out = {a: self.seed_shares[a] for a in active if a in self.seed_shares}
        out |= {d: self.sk1_shares[d] for d in dead if d in self.sk1_shares}
        return out

    # ---- persistence between messages (Flower's context.state) ----
    def state(self) -> dict:
        """The client's state as str -> bytes / int / str (a Flower ConfigRecord's values; lists as JSON)."""
        out: dict = {"cid": self.cid, "t": self.t, "sk1": self.sk1, "sk2": self.sk2, "pk1": self.pk1,
                     "pk2": self.pk2, "seed": self.seed, "masked_with": json.dumps(self.masked_with),
                     "unmasked": int(self.unmasked), "t_min": self.t_min, "m": self.m,
                     "key_ids": json.dumps(sorted(self.keys))}
        for nid, (a, b) in self.keys.items():
            out[f"pk1/{nid}"], out[f"pk2/{nid}"] = a, b
        out |= {f"bs/{k}": v for k, v in self.seed_shares.items()} | {f"ss/{k}": v for k, v in self.sk1_shares.items()}
        return out

    @classmethod
    def from_state(cls, s: dict, params: SecAggParams) -> SecAggClient:
        c = cls(int(s["cid"]), int(s["t"]), params, bytes(s["sk1"]), bytes(s["sk2"]), bytes(s["pk1"]),
                bytes(s["pk2"]), bytes(s["seed"]))
        c.keys = {int(n): (bytes(s[f"pk1/{n}"]), bytes(s[f"pk2/{n}"])) for n in json.loads(str(s["key_ids"]))}
        c.seed_shares = {int(k[3:]): bytes(v) for k, v in s.items() if k.startswith("bs/")}
        c.sk1_shares = {int(k[3:]): bytes(v) for k, v in s.items() if k.startswith("ss/")}
        c.masked_with = [int(x) for x in json.loads(str(s["masked_with"]))]
        c.unmasked, c.t_min, c.m = bool(s["unmasked"]), int(s["t_min"]), int(s["m"])
        return c


# ---------------------------------------------------------------- the server


@dataclass
class SecAggServer:
    """The server's side of one round over `cids`; `bytes_up` / `bytes_down`: {stage: {client: bytes}}.

    `received` logs every payload a client sent (the test of what the server learns reads it)."""

    cids: list[int]
    t: int
    params: SecAggParams
    graph: dict[int, list[int]] = field(default_factory=dict)
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # U0: clients that sent keys
    shared: list[int] = field(default_factory=list)  # U1: clients whose encrypted shares were routed
    survivors: list[int] = field(default_factory=list)  # U2: clients whose masked vector arrived
    masked_sum: list[np.ndarray] | None = None
    names: list[str] = field(default_factory=list)
    shapes: list[tuple] = field(default_factory=list)
    bytes_up: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in UP})
    bytes_down: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in UP})
    received: list[tuple[str, int, object]] = field(default_factory=list)
    reason: str | None = None  # why the round cannot be unmasked
    unmask_result: tuple[dict[str, np.ndarray], int] | None = None  # what `unmask` returned
    bytes_masked_head: dict[int, int] = field(default_factory=dict)  # the head's part of each masked vector

    def __post_init__(self) -> None:
        self.graph = neighbour_graph(self.cids, self.params, self.t)
        self.t_min = self.params.min_shares(len(self.cids))

    def _skip(self, reason: str) -> None:
        self.reason = self.reason or reason

    # stage 0 -> 1
    def collect_keys(self, keys: dict[int, tuple[bytes, bytes] | None]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """The public keys each client receives: its neighbours' that arrived (itself included)."""
        for c, k in keys.items():
            if k is not None:
                self.keys[c] = (bytes(k[0]), bytes(k[1]))
                self.bytes_up["keys"][c] = len(k[0]) + len(k[1])
                self.received.append(("keys", c, k))
        out = {}
        for c in self.keys:
            out[c] = {n: self.keys[n] for n in self.graph[c] if n in self.keys}
            self.bytes_down["keys"][c] = sum(len(a) + len(b) for a, b in out[c].values())
        if len(self.keys) < self.t_min:
            self._skip(f"{len(self.keys)} clients sent keys < threshold {self.t_min}")
        return out

    # stage 1 -> 2
    def route_shares(self, sent: dict[int, dict[int, bytes] | None]) -> dict[int, dict[int, bytes]]:
        """Each client's incoming encrypted shares, from the clients that completed stage 1."""
        self.shared = sorted(c for c, s in sent.items() if s is not None and c in self.keys)
        inbox: dict[int, dict[int, bytes]] = {c: {} for c in self.shared}
        for src in self.shared:
            self.bytes_up["shares"][src] = sum(len(ct) for ct in sent[src].values())
            self.received.append(("shares", src, sent[src]))
            for dst, ct in sent[src].items():
                if dst in inbox and dst in self.graph[src]:
                    inbox[dst][src] = bytes(ct)
        for dst, box in inbox.items():
            self.bytes_down["shares"][dst] = sum(len(ct) for ct in box.values())
        if len(self.shared) < self.t_min:
            self._skip(f"{len(self.shared)} clients shared keys < threshold {self.t_min}")
        return inbox

    # stage 2 -> 3
    def collect_masked(self, masked: dict[int, dict[str, np.ndarray] | None]) -> dict[int, tuple[list[int], list[int]]]:
        """Sum the masked vectors that arrived; what each survivor is asked to unmask: (live, dropped) among its
        neighbours. Nothing when fewer than the threshold survive: the round is skipped."""
        self.survivors = sorted(c for c, v in masked.items() if v is not None and c in self.shared)
        for c in self.survivors:
            v = masked[c]
            self.received.append(("masked", c, v))
            if WEIGHT in v:
                v = {k: v[k] for k in layout(v)}
            self.bytes_up["masked"][c] = sum(np.asarray(a).nbytes for a in v.values())
            self.bytes_masked_head[c] = sum(np.asarray(a).nbytes for k, a in v.items()
                                            if k != WEIGHT and factor_of(k) == "head")
            if self.masked_sum is None:
                self.names, self.shapes = list(v), [np.shape(a) for a in v.values()]
                self.masked_sum = [np.zeros(int(np.prod(s)), dtype=np.uint64) for s in self.shapes]
            if list(v)[:1] != [WEIGHT] or list(v) != self.names or [np.shape(a) for a in v.values()] != self.shapes:
                self._skip(f"client {c}: masked vector of another layout")
                continue
            self.masked_sum = [s + np.asarray(a, dtype=np.uint64).reshape(-1) for s, a in
                               zip(self.masked_sum, v.values(), strict=True)]
        if len(self.survivors) < self.t_min:
            self._skip(f"{len(self.survivors)} masked vectors < threshold {self.t_min}")
        for c in self.survivors:  # SecAgg+: every survivor needs t live neighbours for its b to be recovered
            if len(set(self.graph[c]) & set(self.survivors)) < self.t_min:
                self._skip(f"client {c}: fewer live neighbours than the threshold {self.t_min}")
        if self.reason:
            return {}
        dead = set(self.shared) - set(self.survivors)
        ask = {}
        for c in self.survivors:
            live = [n for n in self.graph[c] if n in self.survivors]
            gone = sorted(n for n in self.graph[c] if n in dead)
            ask[c] = (live, gone)
            self.bytes_down["unmask"][c] = ID_BYTES * (len(live) + len(gone))
        return ask

    # stage 3
    def unmask(self, replies: dict[int, dict[int, bytes] | None]) -> tuple[dict[str, np.ndarray], int] | None:
        """The unmasked sum: ({key: Σ n_i x_i / Σ n_i as float64}, Σ n_i); None (and `reason`) when a secret has
        fewer than t shares: nothing is unmasked in part."""
        if self.reason or self.masked_sum is None:
            return None
        shares: dict[int, list[bytes]] = {}
        for c, rep in replies.items():
            if rep is None or c not in self.survivors:
                continue
            self.received.append(("unmask", c, rep))
            self.bytes_up["unmask"][c] = sum(len(s) for s in rep.values())
            for owner, s in rep.items():
                if c in self.graph[owner]:
                    shares.setdefault(owner, []).append(bytes(s))
        dead = sorted(set(self.shared) - set(self.survivors))
        need = self.survivors + dead
        if short := [o for o in need if len(shares.get(o, [])) < self.t_min]:
            self._skip(f"clients {short}: fewer than {self.t_min} shares to remove their masks")
            return None
        sizes = [a.size for a in self.masked_sum]
        total = list(self.masked_sum)
        for owner in self.survivors:
            b = combine_shares(shares[owner])
            total = [a - m for a, m in zip(total, mask(b, sizes), strict=True)]
        for owner in dead:
            sk1 = bytes_to_private_key(combine_shares(shares[owner]))
            for n in self.graph[owner]:
                if n not in self.survivors:
                    continue
                pairwise = mask(generate_shared_key(sk1, bytes_to_public_key(self.keys[n][0])), sizes)
                # survivor n added the mask if n > owner, subtracted it otherwise: undo that
                total = [(a - m) if n > owner else (a + m) for a, m in zip(total, pairwise, strict=True)]
        weight, arrays = factor_extract([a.reshape(s) for a, s in zip(total, self.shapes, strict=True)])
        n_total = int(weight)
        if n_total <= 0:
            self._skip(f"unmasked example count {n_total}")
            return None
        mean_q = [a.astype(np.float64) / n_total for a in arrays]
        mean = dequantize(mean_q, self.params.clip_range, self.params.levels)
        self.unmask_result = dict(zip(self.names[1:], mean, strict=True)), n_total
        return self.unmask_result

    def dropped(self) -> list[int]:
        """Clients that shared keys but sent no masked vector (their masks removed from their neighbours' shares)."""
        return sorted(set(self.shared) - set(self.survivors))

    def byte_columns(self) -> dict[str, int]:
        """up_secagg_<stage> / down_secagg_<stage> for the round, and the uplink per client."""
        out = {f"up_secagg_{s}": sum(self.bytes_up[s].values()) for s in UP}
        out |= {f"down_secagg_{s}": sum(self.bytes_down[s].values()) for s in UP}
        per = [sum(self.bytes_up[s].get(c, 0) for s in UP) for c in self.cids]
        out["up_secagg_per_client"] = float(np.mean(per)) if per else 0.0
        return out


def check_and_clip(tensors: dict[str, torch.Tensor], spec: dict[str, tuple], start: dict[str, torch.Tensor],
                   max_norm: float | None, clip_range: float) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The client's own check of its upload before masking (the server cannot see it): keys, shapes (its rank's),
    NaN / Inf; the update (upload − start) clipped to `max_norm`; values beyond the quantization range [−c, c]
    refused (they would be clipped silently). Returns (tensors to mask, None) or (None, the reason)."""
    if set(tensors) != set(spec):
        return None, f"wrong keys (missing {sorted(set(spec) - set(tensors))[:3]}, " \
                     f"unexpected {sorted(set(tensors) - set(spec))[:3]})"
    for k, v in tensors.items():
        ref = start.get(k)
        want = tuple(ref.shape) if ref is not None else tuple(spec[k][0])
        if tuple(v.shape) != want:
            return None, f"{k}: shape {tuple(v.shape)} != {want}"
        if not torch.isfinite(v).all():
            return None, f"{k}: contains NaN or Inf"
    if max_norm is not None:
        delta = {k: v.double() - (start[k].double() if k in start else 0) for k, v in tensors.items()}
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
        if norm > max_norm:  # clipped, not refused: the sum stays bounded by n · max_norm
            scale = max_norm / norm
            tensors = {k: ((start[k].double() if k in start else 0) + scale * d).to(tensors[k].dtype)
                       for k, d in delta.items()}
    big = max(float(v.abs().max()) if v.numel() else 0.0 for v in tensors.values()) if tensors else 0.0
    if big > clip_range:
        return None, f"a value of magnitude {big:.4g} is outside federation.secagg_clip_range {clip_range}"
    return tensors, None


# ---------------------------------------------------------------- the stages in one process (the simulation)


def share_keys_in_process(cids: list[int], t: int,
                          params: SecAggParams) -> tuple[SecAggServer, dict[int, SecAggClient]]:
    """Stages 0 and 1 with every message a function call: the server, and each client with its keys shared."""
    server = SecAggServer(list(cids), t, params)
    clients = {c: SecAggClient(c, t, params) for c in cids}
    keys = server.collect_keys({c: clients[c].setup() for c in cids})
    sent = {c: clients[c].share_keys(keys[c], len(cids)) for c in keys} if not server.reason else {}
    for c, box in server.route_shares(sent).items():
        clients[c].receive_shares(box)
    return server, clients


def unmask_in_process(server: SecAggServer, clients: dict[int, SecAggClient],
                      vectors: dict[int, tuple[dict[str, np.ndarray], int] | None]) -> None:
    """Stages 2 and 3: each client's (vector, n_examples) masked (None: it dropped or withheld), then unmasked;
    the result (or why the round is skipped) is on the server."""
    masked = {c: (None if v is None or server.reason else clients[c].masked_vector(*v))
              for c, v in vectors.items() if c in clients and clients[c].seed}
    ask = server.collect_masked(masked)
    server.unmask({c: clients[c].unmask(*ask[c]) for c in ask})
