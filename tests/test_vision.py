"""The packaged EfficientNet-Lite0: our network loads its ImageNet weights strictly and classifies real photos."""

import matplotlib.cbook
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from fedlora.vision.efficientnet import EfficientNetLite0, load_efficientnet_lite0, normalize, weights_path
from fedlora.vision.images import load_image, to_square


@pytest.fixture(scope="module")
def net():
    return load_efficientnet_lite0()


def test_weights_load_strict_every_key():
    sd = torch.load(weights_path(), weights_only=True)
    own = EfficientNetLite0().state_dict()
    assert set(sd) == set(own) and len(sd) == 296
    assert sum(p.numel() for p in EfficientNetLite0().parameters()) == 4_652_008


def test_real_photos_classified(net):
    hopper = load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), 224)
    flower = to_square(Image.fromarray(load_sample_images().images[1]), 224)
    with torch.no_grad():
        logits = net(normalize(torch.stack([hopper, flower])))
    assert logits.argmax(-1).tolist() == [652, 985]  # "military uniform", "daisy"
    assert net.features(normalize(hopper[None])).shape == (1, 1280, 7, 7)
    assert net.features(normalize(torch.zeros(1, 3, 64, 64))).shape == (1, 1280, 2, 2)
