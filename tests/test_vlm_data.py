"""Image-question data: easy-VQA by name, natural clients by question type, images decoded once and shared."""

import numpy as np
import pytest
import torch

from fedlora.config import PartitionConfig
from fedlora.data import Examples, split_task
from fedlora.data.images import attach_images, decode_images
from fedlora.data.tasks import load_task, subset


@pytest.fixture(scope="module")
def vqa():
    task = load_task("easy-vqa")
    return subset(task, np.arange(2000))  # the first 2,000 questions (several per image)


def test_easy_vqa_by_name(vqa):
    assert len(load_task("easy-vqa").texts) == 38_575
    assert len(vqa.label_names) == 13 and vqa.targets == [vqa.label_names[y] for y in vqa.labels]
    assert set(vqa.columns["qtype"]) == {"shape", "color", "yes-no"}


def test_natural_clients_by_question_type(vqa):
    split = split_task(vqa, PartitionConfig(num_clients=3, scheme="natural", column="qtype"), 0)
    kinds = [{vqa.columns["qtype"][i] for i in np.concatenate(c)} for c in split.clients]
    assert sorted(len(k) for k in kinds) == [1, 1, 1] and set().union(*kinds) == {"shape", "color", "yes-no"}
    dirichlet = split_task(vqa, PartitionConfig(num_clients=4, alpha=0.3), 0)
    hist = [np.bincount(np.asarray(vqa.labels)[tr], minlength=13) for tr, _ in dirichlet.clients]
    assert max(h.max() / h.sum() for h in hist) > 0.3  # skewed over answers


def test_images_decoded_once_and_shared(vqa):
    ex = Examples(torch.zeros(len(vqa.texts), 2, dtype=torch.long), torch.ones(len(vqa.texts), 2, dtype=torch.long),
                  torch.zeros(len(vqa.texts), dtype=torch.long))
    ex = attach_images(ex, vqa.images, 32, lambda u8: u8.float() / 255)
    assert len(ex.images) == len(set(vqa.images)) < len(vqa.texts)  # one decode per distinct file
    part = ex.subset(np.arange(5, 50))
    assert part.images is ex.images  # a client's subset shares the store: no copy, no re-decode
    px = part.batch(torch.arange(3))["pixel_values"]
    assert px.shape == (3, 3, 32, 32) and px.dtype == torch.float32


def test_unreadable_image_names_path_and_row(tmp_path, vqa):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png' \(row 3\)"):
        decode_images([vqa.images[0], vqa.images[1], str(bad)], 16)
    with pytest.raises(ValueError, match=r"missing\.png' \(row 1\)"):
        decode_images([str(tmp_path / "missing.png")], 16)


@pytest.mark.parametrize("method", ["fedit", "celora"])
def test_image_classification_on_easy_vqa_images(tmp_path, method):
    from conftest import make_sim

    sim = make_sim(tmp_path, model={"name": "tiny-vit"}, task={"name": "easy-vqa-shape", "max_examples": 300},
                   method={"name": method}, partition={"num_clients": 8, "scheme": "natural", "column": "color",
                                                       "min_partition_size": 2},
                   train={"local_steps": 2, "batch_size": 8})
    assert sim.task.label_names == ["circle", "rectangle", "triangle"] and sim.image_classifier is not None
    batch = sim.client_train[0].batch(torch.arange(2))
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert all(".attention." in t for t in sim.am.targets) and sim.am.head_modules == ["classifier"]
    sim.driver.drive()
    row = sim.history[-1]
    assert row["round"] == 2 and 0 <= row.get("global_accuracy", row.get("personal_accuracy")) <= 1
