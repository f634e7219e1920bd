"""Client-level differential privacy for every method: clip each upload's delta, add Gaussian noise.

    Δ_i = upload_i − the values client i started the round from (over every uploaded tensor, flattened)
    clip:    Δ_i <- Δ_i · min(1, S / ‖Δ_i‖₂)                                  (always, on the client)
    local:   the client adds N(0, (σS)²) to every coordinate of Δ_i before sending
    central: the server adds N(0, (σ S max_i p_i)²) to the weighted mean of the clipped uploads
             (p_i = n_i / Σ n_j: the sensitivity of the mean to one client's clipped delta)
Epsilon for the given δ: Opacus's RDP accountant over t rounds of the sampled Gaussian mechanism with
noise multiplier σ and sampling rate q = clients_per_round / num_clients (central; Poisson-sampling
approximation of the server's sampling without replacement) or q = 1 (local: the server sees who is
sampled, so no amplification; an upper bound, a client that skipped rounds has spent less).
CE-LoRA's data descriptor (sent once, when beta > 0) is a Gaussian mechanism of its own (clipped to
`descriptor_clip`, noise multiplier `descriptor_sigma`, sampling rate 1, one release), composed into
the same accountant; the config refuses DP with a descriptor released without noise. Not covered:
central DP for CE-LoRA (personalized C̄_i, rejected by the config).
"""

from __future__ import annotations

import math

import torch

from ..seeding import torch_generator


def delta_norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))


def clip_delta(delta: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Scale the whole delta (all tensors together) to L2 norm at most `clip`."""
    norm = delta_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}


def gaussian(like: dict[str, torch.Tensor], std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: (torch.randn(v.shape, generator=gen, dtype=torch.float64) * std).to(v.dtype) for k, v in like.items()}


SERVER_ID = 2**31 - 1  # the server's own DP-noise stream: an id no client has


def privatize_upload(upload: dict[str, torch.Tensor], start: dict[str, torch.Tensor], privacy, seed: int, cid: int,
                     t: int) -> dict[str, torch.Tensor]:
    """The client's side: clip the delta to `privacy.clip`; with local DP, add N(0, (σS)²) noise."""
    if privacy.dp == "none":
        return upload
    delta = clip_delta({k: v - start[k] for k, v in upload.items()}, privacy.clip)
    if privacy.dp == "local" and privacy.noise_multiplier > 0:
        noise = gaussian(delta, privacy.noise_multiplier * privacy.clip, torch_generator("dp_noise", seed, cid, t))
        delta = {k: v + noise[k] for k, v in delta.items()}
    return {k: start[k] + delta[k] for k in upload}


def central_noise(like: dict[str, torch.Tensor], weights: list[float], privacy, seed: int,
                  t: int) -> dict[str, torch.Tensor]:
    """The server's noise for the weighted mean of clipped uploads: std σ S max_i p_i."""
    p_max = max(weights) / float(sum(weights))
    std = privacy.noise_multiplier * privacy.clip * p_max
    return gaussian(like, std, torch_generator("dp_noise", seed, SERVER_ID, t))


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
            extra: list[tuple[float, float, int]] = ()) -> float:
    """(ε, δ) after `rounds` of the sampled Gaussian mechanism (plus `extra` (σ, q, steps) mechanisms,
    e.g. CE-LoRA's descriptor release), from Opacus's RDP accountant."""
    if rounds <= 0 and not extra:
        return 0.0
    if noise_multiplier <= 0 or any(s <= 0 for s, _, _ in extra):
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)] * (rounds > 0) + list(extra)
    return float(acc.get_epsilon(delta))


def run_epsilon(cfg, rounds: int) -> float | None:
    """The run's ε after `rounds` rounds (None without DP), CE-LoRA's descriptor release included."""
    pr = cfg.privacy
    if pr.dp == "none":
        return None
    n, k = cfg.partition.num_clients, cfg.federation.clients_per_round
    q = 1.0 if pr.dp == "local" or k is None else min(1.0, k / n)
    from ..methods import get_method
    from ..methods.capabilities import SendsDescriptor

    method = get_method(cfg.method.name)
    release = method.descriptor_release(cfg) if issubclass(method, SendsDescriptor) else None
    extra = [(release[0], 1.0, release[1])] if release is not None else []  # every client, q = 1
    return epsilon(pr.noise_multiplier, q, rounds, pr.delta, extra)
