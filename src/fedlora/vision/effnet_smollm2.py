"""The offline VLM: the packaged EfficientNet-Lite0 (ImageNet) + a projector + SmolLM2-135M-Instruct, as LLaVA.

transformers' `LlavaForConditionalGeneration` with its vision tower replaced by the EfficientNet, whose last
feature map (1280 channels, (S/32)² positions) becomes the image tokens: 2×2 = 4 at easy-VQA's native 64 px,
7×7 = 49 at 224 px. SmolLM2's weights go into the language model unchanged, plus one added `<image>` token, so
that on text alone it computes exactly what SmolLM2 does. The projector (1280 -> 576 -> 576, GELU) is aligned
once, as LLaVA's first stage: trained alone, on captions ("a blue circle") of easy-VQA's *test* images, which no
client holds, and cached like the GGUF conversion. A VLM that users fine-tune already sees.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .efficientnet import FEATURES, load_efficientnet_lite0, normalize
from .vlm import IMAGE_TOKEN, VisionLanguage, vlm_tokenizer

log = logging.getLogger("fedlora")
DEFAULT_SIZE = 64  # chosen by accuracy against step time (docs/vlm.md)


class EffNetTower(nn.Module):
    """The frozen EfficientNet as a LLaVA vision tower: the feature map as a sequence of image tokens."""

    def __init__(self):
        super().__init__()
        self.net = load_efficientnet_lite0()
        self.net._fc = nn.Identity()  # the ImageNet classifier is not part of the tower

    def train(self, mode: bool = True) -> EffNetTower:
        return super().train(False)  # always eval: frozen BatchNorm statistics, even while the LM trains

    def forward(self, pixel_values: torch.Tensor, **_) -> BaseModelOutputWithPooling:
        t = self.net.features(pixel_values).flatten(2).transpose(1, 2)  # (B, h·w, 1280)
        return BaseModelOutputWithPooling(last_hidden_state=t, hidden_states=(t,))


def build_effnet_smollm2(image_size: int = DEFAULT_SIZE, seed: int = 0) -> VisionLanguage:
    """The assembled model, projector at its random initialisation (`load_effnet_smollm2` aligns it)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..models import load_causal_lm

    if image_size % 32:
        raise ValueError(f"model.image_size: {image_size} is not a multiple of 32 (the EfficientNet's stride)")
    tok = vlm_tokenizer()
    lm = load_causal_lm("smollm2", seed)
    text = lm.config.to_dict() | {"vocab_size": len(tok)}
    # the stub vision config only sets the projector's input width; the tower itself is replaced below
    vision = CLIPVisionConfig(hidden_size=FEATURES, intermediate_size=8, num_hidden_layers=0, num_attention_heads=8,
                              image_size=image_size, patch_size=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu",
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower = EffNetTower()
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        state = {k: v for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
        missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"embed_tokens.weight"}:
            raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
        new = model.get_input_embeddings().weight
        new[: len(emb)] = emb
        new[len(emb):] = emb.mean(0)  # the <image> row: never seen as a token (replaced by image features)
        model.lm_head.weight = model.get_input_embeddings().weight  # tied, as in SmolLM2
    model.config.use_cache = True
    n = (image_size // 32) ** 2
    return VisionLanguage(model.eval(), tok, IMAGE_TOKEN * n, image_size,
                          lambda u8: normalize(u8), "model.multi_modal_projector", "effnet-smollm2")


def caption_task():
    """Captions of easy-VQA's test images ("a blue circle"), read off their questions: the alignment data."""
    from ..data.tasks import Task, easy_vqa_image_labels

    labels = easy_vqa_image_labels("test")
    caps = [f"a {c} {s}" for c, s in labels.values()]
    return Task("easy-vqa-captions", ["Describe the image."] * len(caps), [0] * len(caps), ["caption"],
                {"image": list(labels)}, caps)


def align_projector(vlm: VisionLanguage, steps: int = 24, batch_size: int = 8, lr: float = 3e-3,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaVA's first stage: the projector alone trained on captions (tower and LM frozen)."""
    from .vlm import tokenize_vlm

    data = tokenize_vlm(vlm, caption_task(), 96)
    proj = vlm.model.get_submodule(vlm.projector)
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    for p in proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    vlm.model.train()
    start = time.time()
    for step in range(steps):
        loss = vlm.model(**data.batch(torch.randint(len(data), (batch_size,), generator=g))).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == steps - 1:
            log.info("projector alignment: step %d/%d, loss %.3f (%.0f s)", step + 1, steps, loss.item(),
                     time.time() - start)
    vlm.model.eval()
    for p in proj.parameters():
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in proj.state_dict().items()}


def load_effnet_smollm2(image_size: int = DEFAULT_SIZE, seed: int = 0, steps: int = 24) -> VisionLanguage:
    """The offline VLM with its aligned projector (aligned on first use, then read from the cache)."""
    from safetensors.torch import load_file, save_file

    from ..models import _atomic_dir, cache_dir

    vlm = build_effnet_smollm2(image_size, seed=0)
    out = cache_dir() / f"effnet-smollm2-projector-{image_size}px-{steps}steps"
    if not (out / "projector.safetensors").is_file():
        log.info("effnet-smollm2: aligning the projector once (%d steps, %d px), cached in %s", steps, image_size, out)
        state = align_projector(vlm, steps)
        _atomic_dir(out, lambda d: (d.mkdir(parents=True), save_file(state, str(d / "projector.safetensors"))))
    vlm.model.get_submodule(vlm.projector).load_state_dict(load_file(str(out / "projector.safetensors")))
    return vlm
