"""Vision-language models: what a run needs of one, however it was built.

`VisionLanguage` holds the model (a Hugging Face image-text-to-text model), its tokenizer, the text of one
image in a prompt (the image placeholder tokens, expanded), the image size and how uint8 images become the
model's `pixel_values`, and where its projector and language model sit (the adapters go on the language
model's linear layers; the projector is the trained "head" factor; the vision tower stays frozen).

Built from: "tiny-llava", "tiny-idefics3", "tiny-smolvlm" (random, small, for tests), "effnet-smollm2"
(the packaged EfficientNet-Lite0 + SmolLM2, `fedlora.vision.effnet_smollm2`), or any folder / hub name
through `AutoModelForImageTextToText` + `AutoProcessor` (one image of a fixed size per prompt).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

IMAGE_TOKEN = "<image>"
PROJECTORS = ("multi_modal_projector", "connector", "visual.merger")
LM_TARGETS = r".*(language_model|text_model)\..*\.(q_proj|k_proj|v_proj|o_proj)"  # the LM's attention projections


@dataclass
class VisionLanguage:
    model: nn.Module
    tokenizer: object
    image_text: str  # one image in a prompt: its placeholder tokens, as many as the image gives features
    image_size: int  # images are decoded once at size×size
    pixels: Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, 3, S, S) -> the model's pixel_values
    projector: str  # module path of the projector (the trained "head" factor)
    name: str = ""


def module_path(model: nn.Module, suffixes: tuple[str, ...]) -> str | None:
    for n, _ in model.named_modules():
        if any(n == s or n.endswith("." + s) for s in suffixes):
            return n
    return None


def normalizer(mean, std, five_d: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def pixels(u8: torch.Tensor) -> torch.Tensor:
        x = (u8.float() / 255.0 - m) / s
        return x.unsqueeze(1) if five_d else x  # Idefics3 / SmolVLM: (B, images per prompt, 3, H, W)
    return pixels


@functools.cache
def vlm_tokenizer():
    """SmolLM2's tokenizer with one added special token, the image placeholder (read once per process)."""
    from transformers import AutoTokenizer

    from ..models import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def tiny_vlm(kind: str, seed: int) -> VisionLanguage:
    """A small random VLM from a config (tests): CLIP-style 32 px tower (patch 8) + a 2-layer Llama."""
    import transformers as T

    from ..models import TINY_LLAMA

    torch.manual_seed(seed)
    tok = vlm_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = T.LlamaConfig(vocab_size=len(tok), **TINY_LLAMA)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    if kind == "llava":
        cfg = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**vision, projection_dim=32), text_config=text,
                            image_token_index=image_id, vision_feature_select_strategy="default",
                            vision_feature_layer=-1, projector_hidden_act="gelu")
        model, n_tokens, five_d = T.LlavaForConditionalGeneration(cfg), (32 // 8) ** 2, False
    else:
        cls = T.Idefics3ForConditionalGeneration if kind == "idefics3" else T.SmolVLMForConditionalGeneration
        ccls = T.Idefics3Config if kind == "idefics3" else T.SmolVLMConfig
        vcls = T.Idefics3VisionConfig if kind == "idefics3" else T.SmolVLMVisionConfig
        cfg = ccls(vision_config=vcls(**vision), text_config=text, image_token_id=image_id, scale_factor=2,
                   pad_token_id=tok.pad_token_id)
        model, n_tokens, five_d = cls(cfg), (32 // 8) ** 2 // 4, True
    model.config.use_cache = True
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return VisionLanguage(model.eval(), tok, IMAGE_TOKEN * n_tokens, 32, normalizer(mean, std, five_d),
                          module_path(model, PROJECTORS), f"tiny-{kind}")


def hub_vlm(name: str, path: str) -> VisionLanguage:
    """A pretrained image-text-to-text model and its processor (folder or hub name): the image placeholder
    text and the pixel_values layout are read off the processor's output for one blank image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..models import unreachable

    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise unreachable(name, e) from None
    return from_processor(model, processor, name)


def from_processor(model: nn.Module, processor, name: str = "") -> VisionLanguage:
    """A `VisionLanguage` of a model object and its processor (the Python API passes these)."""
    from PIL import Image

    ip = processor.image_processor
    token = getattr(processor, "image_token", IMAGE_TOKEN)
    probe = processor(text=token, images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    px = probe["pixel_values"]
    if px.dim() not in (4, 5) or px.shape[-1] != px.shape[-2] or (px.dim() == 5 and px.shape[1] != 1):
        raise ValueError(f"model.name '{name}': its processor gives pixel_values of shape {tuple(px.shape)}; "
                         f"fedlora feeds one fixed-size square image per prompt (LLaVA, Idefics3 / SmolVLM without "
                         f"image splitting)")
    image_text = processor.tokenizer.decode(probe["input_ids"][0], skip_special_tokens=False)
    bos = processor.tokenizer.bos_token
    if bos and image_text.startswith(bos):
        image_text = image_text[len(bos):]
    projector = module_path(model, PROJECTORS)
    if projector is None:
        raise ValueError(f"model.name '{name}': no projector module found (looked for {', '.join(PROJECTORS)})")
    return VisionLanguage(model.eval(), processor.tokenizer, image_text, int(px.shape[-1]),
                          normalizer(ip.image_mean, ip.image_std, px.dim() == 5), projector, name)


def load_vlm(name: str, seed: int) -> VisionLanguage:
    """A VLM by short name ("tiny-llava", "tiny-idefics3", "tiny-smolvlm", "effnet-smollm2"), folder or hub name."""
    if name in ("tiny-llava", "tiny-idefics3", "tiny-smolvlm"):
        return tiny_vlm(name.removeprefix("tiny-"), seed)
    if name == "effnet-smollm2":
        from .effnet_smollm2 import load_effnet_smollm2

        return load_effnet_smollm2()
    from ..models import resolve_model_path

    return hub_vlm(name, resolve_model_path(name))


def tokenize_vlm(vlm: VisionLanguage, task, max_length: int):
    """Chat-formatted "image + question" prompts and answers (loss on the answer tokens only: image and prompt
    tokens are -100), with each row's image decoded once (`fedlora.data.images`)."""
    from ..config import ConfigError
    from ..data.images import attach_images
    from ..data.loader import tokenize_causal

    prompts = [f"{vlm.image_text}\n{q}" for q in task.texts]
    ex = tokenize_causal(vlm.tokenizer, prompts, task.targets, max_length)
    if int(ex.prompt_len.max()) >= max_length:
        raise ConfigError(f"model.max_length: {max_length} tokens cut some prompts (chat template, "
                          f"{len(vlm.tokenizer(vlm.image_text)['input_ids'])} image tokens and the question); raise it")
    return attach_images(ex, task.images, vlm.image_size, vlm.pixels, task.columns.get("image_where"))
