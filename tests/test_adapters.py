"""The low-rank layer, injection, state by factor, merge, and PEFT export round-trip."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

from fedlora.adapters import LowRankLinear, export_peft, inject_adapters
from fedlora.models import load_classifier, load_tokenizer


def tiny_model(seed: int = 0):
    return load_classifier("tiny-bert", num_labels=3, seed=seed)


def batch():
    tok = load_tokenizer("tiny-bert")
    return dict(tok(["a short sentence about rivers", "the engine of a car"], padding=True, return_tensors="pt"))


def randomize(am, seed=1):
    g = torch.Generator().manual_seed(seed)
    am.set_state({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in am.get_state().items()})


def test_layer_math_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LowRankLinear(base, r=2, alpha=4, tri=True)
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), base(x))  # C = 0 -> ΔW = 0
    with torch.no_grad():
        layer.B.normal_()
        layer.C.normal_()
    expected = base(x) + 2.0 * x @ (layer.B @ layer.C @ layer.A).t()
    torch.testing.assert_close(layer(x), expected)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


def test_injection_by_pattern_state_and_trainable():
    model = tiny_model()
    am = inject_adapters(model, ["query", "value"], r=4, alpha=8)
    assert len(am.targets) == 4 and all(t.endswith(("query", "value")) for t in am.targets)
    assert am.head_modules == ["classifier"]
    state = am.get_state(["A"])
    assert set(state) == {f"{t}.A" for t in am.targets} and state[f"{am.targets[0]}.A"].shape == (4, 32)
    am.set_trainable({"B", "head"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.B" for t in am.targets} | {"classifier.weight", "classifier.bias"}
    # regex patterns on the full path
    am2 = inject_adapters(tiny_model(), [r".*layer\.0\..*query"], r=2, alpha=2)
    assert am2.targets == ["bert.encoder.layer.0.attention.self.query"]


def test_injection_errors_name_the_problem():
    with pytest.raises(ValueError, match="match no linear layer.*query"):
        inject_adapters(tiny_model(), ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="rank r=64 is larger than the layer"):
        inject_adapters(tiny_model(), ["query"], r=64, alpha=8)
    am = inject_adapters(tiny_model(), ["query"], r=2, alpha=2)
    with pytest.raises(ValueError, match="shape"):
        am.set_state({f"{am.targets[0]}.A": torch.zeros(3, 3)})


def test_model_merge_keeps_logits():
    am = inject_adapters(tiny_model(), ["query", "value"], r=4, alpha=8)
    randomize(am)
    x = batch()
    before = am.model(**x).logits
    am.merge()
    torch.testing.assert_close(am.model(**x).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tri", [False, True])
def test_peft_export_round_trip(tmp_path, tri):
    am = inject_adapters(tiny_model(), ["query", "value"], r=4, alpha=8, tri=tri)
    randomize(am)
    x = batch()
    ours = am.model(**x).logits
    export_peft(am.get_state(), tmp_path / "adapter", r=am.r, alpha=am.alpha, targets=am.targets,
                head_modules=am.head_modules)
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    theirs = peft_model(**x).logits
    assert (ours - theirs).abs().max() < 1e-5
    # and it is not trivially equal to the base model
    assert (tiny_model()(**x).logits - theirs).abs().max() > 1e-3
