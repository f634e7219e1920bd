"""Vision-language models as a task: tiny random LLaVA / Idefics3 / SmolVLM on easy-VQA, every method in process."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedlora.config import build_config
from fedlora.data.tasks import load_task, subset
from fedlora.methods import METHODS
from fedlora.runtime.simulation import Simulation
from fedlora.vision.vlm import IMAGE_TOKEN, load_vlm, tokenize_vlm

FAMILIES = ("tiny-llava", "tiny-smolvlm", "tiny-idefics3")


@pytest.fixture(scope="module")
def vqa():
    task = load_task("easy-vqa")
    rows = np.random.default_rng(0).choice(len(task.texts), 90, replace=False)
    return subset(task, np.sort(rows))


def vlm_sim(tmp_path, task, model="tiny-llava", **sections):
    base = dict(model={"name": model, "max_length": 80}, task={"name": "easy-vqa"},
                partition={"num_clients": 3, "scheme": "natural", "column": "qtype", "min_partition_size": 2},
                train={"local_steps": 1, "batch_size": 4},
                eval={"every": 2, "max_global_examples": 8, "max_client_examples": 4, "generate_examples": 2,
                      "max_new_tokens": 2})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    cfg = build_config(tiny_config(tmp_path, **base))
    return Simulation(cfg, tmp_path / "runs" / cfg.method.name, task=task)


# every method, two rounds, on a VLM; the families take turns so that each runs several methods
@pytest.mark.parametrize("i,method", list(enumerate(sorted(METHODS))))
def test_every_method_two_rounds(tmp_path, vqa, i, method):
    sim = vlm_sim(tmp_path, vqa, FAMILIES[i % 3], method={"name": method})
    vision = {n: p.clone() for n, p in sim.am.model.named_parameters() if "vision" in n}
    sim.driver.drive()
    row = sim.history[-1]
    assert row["round"] == 2 and np.isfinite(row.get("global_loss", row.get("personal_loss")))
    assert "global_exact_match" in row or "personal_exact_match" in row  # VQA accuracy by generation
    assert all(torch.equal(p, vision[n]) for n, p in sim.am.model.named_parameters() if n in vision)  # frozen
    keys = sim.am.keys()
    assert all("language_model" in k or "text_model" in k or k.startswith(sim.vlm.projector) for k in keys)
    assert any(k.startswith(sim.vlm.projector) for k in keys)  # the projector is a trained factor ("head")


def test_projector_frozen_and_bytes(tmp_path, vqa):
    shared = vlm_sim(tmp_path / "a", vqa, method={"name": "fedit"})
    frozen = vlm_sim(tmp_path / "b", vqa, method={"name": "fedit"}, adapter={"head_modules": []})
    assert not any(k.startswith(frozen.vlm.projector) for k in frozen.am.keys())
    shared.driver.drive()
    frozen.driver.drive()
    head = sum(p.numel() * 4 for p in shared.am.model.get_submodule(shared.vlm.projector).parameters())
    assert shared.history[0]["up_raw_head"] == 3 * head  # the projector's bytes travel and are counted
    assert frozen.history[0].get("up_raw_head", 0) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_carry_no_loss(vqa, family):
    vlm = load_vlm(family, 0)
    ex = tokenize_vlm(vlm, vqa, 80)
    image_id = vlm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (ex.labels[ex.input_ids == image_id] == -100).all()
    for r in range(5):  # the targets are exactly the answer and end of turn
        target = ex.labels[r][ex.labels[r] != -100]
        assert vlm.tokenizer.decode(target, skip_special_tokens=True).strip() == vqa.targets[r]
        assert (ex.labels[r, :int(ex.prompt_len[r])] == -100).all()
    batch = ex.batch(torch.arange(4))
    logits = vlm.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    own = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(vlm.model(**batch).loss, own, atol=1e-5)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-smolvlm"])
def test_peft_export_round_trips_logits(tmp_path, vqa, family):
    from peft import PeftModel

    from fedlora.adapters import export_with_meta

    sim = vlm_sim(tmp_path, vqa, family, method={"name": "celora"})  # tri-matrix: C folded into lora_B
    sim.driver.drive()
    state = sim.eval_state(1)  # a client's personal model, its projector included
    assert any(k.startswith(sim.vlm.projector) for k in state) and any(k.endswith(".C") for k in state)
    out = export_with_meta(state, tmp_path / "peft", sim.adapter_meta())
    batch = {k: v for k, v in sim.client_test[1].batch(torch.arange(3)).items() if k != "labels"}
    sim.am.set_state(state)
    with torch.no_grad():
        ours = sim.am.model(**batch).logits
        fresh = load_vlm(family, 0).model  # the same base, rebuilt
        before = fresh(**batch).logits
        peft = PeftModel.from_pretrained(fresh, str(out)).eval()
        theirs = peft(**batch).logits
    assert not torch.allclose(before, ours, atol=1e-4)  # the adapters and projector changed the model
    assert torch.allclose(theirs, ours, atol=1e-4)


def test_assembled_vlm_is_smollm2_on_text():
    """effnet-smollm2 without adapters, on text alone, computes SmolLM2's logits (one added vocabulary row aside)."""
    from fedlora.models import load_causal_lm
    from fedlora.vision.effnet_smollm2 import build_effnet_smollm2

    vlm, lm = build_effnet_smollm2(64), load_causal_lm("smollm2", 0)
    ids = vlm.tokenizer(["What is the capital of France?", "Name a colour."], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs = vlm.model(**ids).logits, lm(**ids).logits
    assert ours.shape[-1] == theirs.shape[-1] + 1  # the <image> token
    assert torch.allclose(ours[..., :-1], theirs, atol=1e-4, rtol=0)
    assert torch.equal(ours[..., :-1].argmax(-1), theirs.argmax(-1))
    out = vlm.model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, lm.generate(**ids, max_new_tokens=5, do_sample=False))
    assert vlm.image_text.count("<image>") == 4  # 64 px: a 2×2 feature map
