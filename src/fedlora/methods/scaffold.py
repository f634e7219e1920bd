"""SCAFFOLD: FedIT with control variates that correct each client's drift, on the server-held factors.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020
(Algorithm 1, option II for the client variate).

    train A, B;  upload A, B (+ a shared head) and Δc_i;  x <- Σ p_i y_i,  p_i = n_i / Σ n_j
    personal: the client variate c_i (and the head, if personal); the server holds x and c.
    client i, from x (the downloaded factors), K local steps, learning rate η (per factor):
      y <- step of the local optimizer on F_i,  then  y <- y − η (c − c_i)      (every step)
      c_i+ = c_i − c + (x − y) / (K η);   sends Δy_i = y − x (as y) and Δc_i = c_i+ − c_i
    server:  c <- c + (|S| / N) Σ_{i∈S} p_i Δc_i   (N: all clients; c_0 = c_i,0 = 0)

With SGD (`train.optimizer: sgd`) the local step is y − η (g_i(y) − c_i + c), the paper's rule; with
AdamW the correction is applied after the step, decoupled like weight decay (as OpenFedLLM does).
The paper averages uniformly; here Δy and Δc take the example weights p_i of every other method, so
the fixed point is the minimizer of Σ_i p_i F_i. The variates are real payload: c is downloaded
whenever it changed (every aggregated round after the first: c_0 = 0 is known to all), Δc_i is
uploaded every round, each as large as the factors it controls; both are in the byte columns.
Not combined with DP: the variates would leave the client unclipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters import factor_of
from ..train import LocalHook, factor_lr
from .base import is_adapter_key, register, weighted_mean
from .capabilities import KeepsClientState, TrainsWithHook
from .fedit import FedIT

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..federation import ClientState, Server, Upload

C, CI, DC = "scaffold/c/", "scaffold/ci/", "scaffold/dc/"  # server variate, client variate, its change


class DriftCorrection(LocalHook):
    def __init__(self, correction: dict[str, torch.Tensor]):
        self.correction = correction  # c − c_i per key

    def after_step(self, params: dict[str, torch.nn.Parameter], lrs: dict[str, float]) -> None:
        for k, d in self.correction.items():
            params[k].sub_(lrs[k] * d.to(params[k].dtype))


@register
class Scaffold(TrainsWithHook, KeepsClientState, FedIT):
    name = "scaffold"
    batchable = False  # its local training has a hook (a loss term / a correction), not plain local_train

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.privacy.dp != "none":
            raise ValueError("privacy.dp: scaffold's control variates would be sent without clipping or noise")

    def controlled(self, state: ClientState, t: int) -> list[str]:
        """The uploaded server-held keys: the ones the variates correct."""
        up = self.uploaded(t)
        return [k for k in state.shared if is_adapter_key(k) and factor_of(k) in up]

    @staticmethod
    def variates(state: ClientState, k: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, c_i) for key k as the client holds them; zeros before the first exchange."""
        held = {**state.shared, **state.personal}
        zero = torch.zeros_like(state.shared[k])
        return held.get(C + k, zero), held.get(CI + k, zero)

    def local_hook(self, state: ClientState, t: int) -> LocalHook | None:
        corr = {}
        for k in self.controlled(state, t):
            c, ci = self.variates(state, k)
            corr[k] = c - ci
        return DriftCorrection(corr)

    def after_local(self, state, trained, t, stats):
        steps = int(stats.get("steps", 0))
        sent, kept = {}, {}
        for k in self.controlled(state, t):
            c, ci = self.variates(state, k)
            lr = factor_lr(factor_of(k), self.cfg.train)
            drift = (state.shared[k] - trained[k]) / (steps * lr) if steps else torch.zeros_like(ci)  # (x − y)/(Kη)
            ci_new = ci - c + drift
            sent[DC + k], kept[CI + k] = ci_new - ci, ci_new
        return sent, kept

    def upload_spec(self, t: int, spec: dict[str, tuple]) -> dict[str, tuple]:
        base = super().upload_spec(t, spec)
        return {**base, **{DC + k: s for k, s in base.items()}}

    def aggregate_mean(self, server: Server, t: int, mean: Upload, count: int) -> None:
        self._aggregate(server, t, [mean], count)  # secure aggregation: Σ p_i Δc_i over `count` clients

    def aggregate(self, server: Server, t: int, uploads: list[Upload]) -> None:
        self._aggregate(server, t, uploads, len(uploads))

    def _aggregate(self, server: Server, t: int, uploads: list[Upload], count: int) -> None:
        super().aggregate(server, t, uploads)  # x <- Σ p_i y_i over the factors (the DC keys are not held)
        share = count / server.num_clients
        weights = [u.n_examples for u in uploads]
        for dk in [k for k in uploads[0].tensors if k.startswith(DC)]:
            k = dk[len(DC):]
            mean = weighted_mean([u.tensors[dk] for u in uploads], weights)
            old = server.global_state.get(C + k, torch.zeros_like(mean))
            server.global_state[C + k] = (old.double() + share * mean.double()).to(mean.dtype)
            server.version[C + k] = t
