"""Device, precision and cheap evaluation: bf16 autocast with fp32 masters, merged eval, eval.clients, one sync."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch
import yaml
from conftest import make_sim, tiny_config
from typer.testing import CliRunner

from fedlora import compute
from fedlora.accounting import payload_bytes
from fedlora.adapters import LowRankLinear
from fedlora.cli import app
from fedlora.config import ConfigError, build_config
from fedlora.federation import Download, Upload
from fedlora.seeding import rng
from fedlora.train import evaluate, local_train

runner = CliRunner()
LLM = dict(model={"name": "tiny-llama", "max_length": 64}, task={"name": "chatterbot-qa", "max_examples": 60},
           partition={"num_clients": 2, "scheme": "iid", "min_partition_size": 5}, train={"batch_size": 4})


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def cli_error(tmp_path, *args, **sections) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    res = runner.invoke(app, ["run", str(p), *args])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
    return res.output


def test_device_cuda_without_cuda_fails_in_one_line_exit_2(tmp_path, monkeypatch):
    no_cuda(monkeypatch)
    assert "device: 'cuda' but this machine has no CUDA device" in cli_error(tmp_path, "--set", "device=cuda")
    assert "device: 'cuda:1'" in cli_error(tmp_path, "--set", "device=cuda:1")
    assert "device" in cli_error(tmp_path, "--set", "device=gpu")  # not a device name at all
    assert compute.resolve_device("auto").type in ("cpu", "mps")  # auto falls back, never fails


def test_quantization_needs_cuda_and_a_causal_lm(tmp_path, monkeypatch):
    no_cuda(monkeypatch)
    out = cli_error(tmp_path, "--set", "model.quantization=4", "--set", "device=cpu")
    assert "model.quantization: 4-bit needs a CUDA device" in out
    with pytest.raises(ConfigError, match="model.quantization"):
        build_config({"model": {"quantization": 3}})
    # the classifier check comes after the device check: fake a CUDA device to reach it
    monkeypatch.setattr("fedlora.run.resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr("fedlora.run.check_precision", lambda p, d: None)
    with pytest.raises(ConfigError, match="model.quantization is for causal LMs"):
        make_sim(tmp_path, model={"name": "tiny-bert", "max_length": 16, "quantization": 8})


def test_non_fp32_base_needs_autocast():
    with pytest.raises(ConfigError, match="model.dtype bf16 needs precision bf16 or fp16"):
        build_config({"model": {"dtype": "bf16"}})
    build_config({"model": {"dtype": "bf16"}, "precision": "bf16"})


def test_bf16_trains_under_autocast_with_fp32_masters(tmp_path, monkeypatch):
    seen, opts = [], []
    original = torch.optim.AdamW

    def spy(*args, **kwargs):
        opts.append(original(*args, **kwargs))
        return opts[-1]

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    sim = make_sim(tmp_path, model={"name": "tiny-bert", "max_length": 16, "dtype": "bf16"}, precision="bf16",
                   federation={"rounds": 1})
    layer = next(iter(sim.am.layers.values()))
    layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    row = sim.run_round(1)
    assert layer.base.weight.dtype == torch.bfloat16  # the frozen base halved
    assert all(p.dtype == torch.float32 for p in sim.am._params.values())  # factors and head: fp32 masters
    assert torch.bfloat16 in seen  # the layers really computed in bf16
    moments = [s["exp_avg"] for o in opts for s in o.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(v.dtype == torch.float32 for v in sim.server.global_state.values())
    assert row["global_accuracy"] >= 0 and row["train_loss"] == row["train_loss"]  # finite, not NaN
    fp32 = make_sim(tmp_path / "fp32", federation={"rounds": 1}).run_round(1)
    assert fp32["train_loss"] != row["train_loss"]  # bf16 is not fp32 under another name


def test_fp16_uses_a_grad_scaler():
    assert compute.grad_scaler(torch.device("cpu"), "fp16").is_enabled()
    assert not compute.grad_scaler(torch.device("cpu"), "bf16").is_enabled()


def test_bf16_upload_is_counted_at_half_the_bytes_of_fp32(tmp_path):
    sim = make_sim(tmp_path, federation={"rounds": 1})
    state = {k: v for k, v in sim.init_state.items() if k in sim.server.expected_keys(1)}
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert payload_bytes(half)["raw"] * 2 == payload_bytes(state)["raw"]
    rows = {}
    for name, tensors in (("fp32", state), ("bf16", half)):
        dl = {0: Download(0, 1, {})}
        rows[name] = sim.server.finish_round(1, dl, {0: Upload(0, 1, tensors, n_examples=4)})
    assert rows["bf16"]["up_raw"] * 2 == rows["fp32"]["up_raw"] > 0
    assert rows["bf16"]["rejected"]  # the server still holds fp32: a bf16 upload is counted, then refused


def test_merged_evaluation_matches_unmerged_and_restores_w0_exactly(tmp_path):
    sim = make_sim(tmp_path)
    g = torch.Generator().manual_seed(0)
    sim.am.set_state({k: torch.randn(v.shape, generator=g) * 0.2 for k, v in sim.am.get_state().items()})
    w0 = {t: layer.base.weight.detach().clone() for t, layer in sim.am.layers.items()}
    merged_during = []
    layer = next(iter(sim.am.layers.values()))
    layer.register_forward_hook(lambda m, i, o: merged_during.append(m.merged))
    merged = evaluate(sim.am, sim.global_test)
    assert merged_during and all(merged_during)  # evaluation really ran on merged weights
    assert all(torch.equal(sim.am.layers[t].base.weight, w) for t, w in w0.items())  # bit for bit
    assert not layer.merged
    sim.am.merged = contextlib.nullcontext  # the unmerged reference
    plain = evaluate(sim.am, sim.global_test)
    assert merged["accuracy"] == plain["accuracy"] and merged["loss"] == pytest.approx(plain["loss"], abs=1e-5)


def test_bf16_base_is_not_merged():
    base = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert not LowRankLinear(base, 2, 4).mergeable and LowRankLinear(torch.nn.Linear(8, 8), 2, 4).mergeable


def test_eval_clients_is_a_fixed_seeded_subset_plus_participants(tmp_path):
    sim = make_sim(tmp_path, partition={"num_clients": 6, "scheme": "iid"}, eval={"clients": 2},
                   federation={"rounds": 2})
    want = sorted(rng("eval_clients", 0).permutation(6)[:2].tolist())
    rows = [sim.run_round(t) for t in (1, 2)]
    assert all(r["eval_clients"] == want and len(r["client_accuracy"]) == 2 for r in rows)
    sim = make_sim(tmp_path, partition={"num_clients": 6, "scheme": "iid"}, eval={"clients": 1, "participants": True},
                   federation={"rounds": 2, "clients_per_round": 2})
    for t in (1, 2):
        r = sim.run_round(t)
        assert set(r["clients"]) <= set(r["eval_clients"]) and len(r["client_accuracy"]) == len(r["eval_clients"])
    with pytest.raises(ConfigError, match="eval.clients"):
        build_config(tiny_config(tmp_path, eval={"clients": 9}))


def test_eval_clients_subset_with_personal_state(tmp_path):
    sim = make_sim(tmp_path, partition={"num_clients": 5, "scheme": "iid"}, method={"name": "fedsa"},
                   eval={"clients": 2, "global_clients": 3})
    r = sim.run_round(1)
    assert len(r["client_accuracy"]) == 2 and "global_accuracy" in r


def test_training_reads_the_loss_once_per_round(tmp_path, monkeypatch):
    sim = make_sim(tmp_path)
    calls = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self):  # a host read made by fedlora's training loop itself (AdamW's CPU step counters aside)
            calls.append(sys._getframe(1).f_globals["__name__"] == "fedlora.train")
            return original(self)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "__float__", "tolist"):
        spy(name)
    stats = local_train(sim.am, sim.train_sets[0], sim.streams[0], {"A", "B"}, sim.cfg.train, 5)
    assert sum(calls) == 1 and stats["steps"] == 5


def test_checkpoint_carries_the_cuda_rng_state(tmp_path, monkeypatch):
    sim = make_sim(tmp_path)
    state = [torch.arange(4, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.append(s))
    sim.device = torch.device("cuda", 0)
    snap = sim.snapshot()
    assert snap["rng"]["cuda"] is state
    sim.restore(snap)
    assert restored == [state]
    sim.device = torch.device("cpu")
    assert "cuda" not in sim.snapshot()["rng"]


def test_cli_bf16_run_writes_metrics(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tmp_path, precision="bf16", device="cpu", federation={"rounds": 1})))
    res = runner.invoke(app, ["run", str(p), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["global_accuracy"] >= 0


def test_causal_lm_in_bf16(tmp_path):
    sim = make_sim(tmp_path, precision="bf16", federation={"rounds": 1}, **LLM)
    r = sim.run_round(1)
    assert r["global_loss"] == r["global_loss"] and r["global_perplexity"] > 1
