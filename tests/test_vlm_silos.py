"""A user's own image-question data: JSONL + image files, or a Hugging Face dataset with an Image column; silos
that hold their own images (in process, and on Flower)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from fedlora.config import build_config
from fedlora.data.tasks import load_task
from fedlora.runtime.simulation import Simulation

EVAL = {"every": 2, "max_client_examples": 4, "generate_examples": 2, "max_new_tokens": 2}


def write_vqa_silos(root: Path, n_clients: int = 3, per_client: int = 12) -> list[str]:
    """Client i: easy-VQA questions of one question type, its images copied into its own folder + data.jsonl."""
    task = load_task("easy-vqa")
    kinds = ["shape", "color", "yes-no"]
    files = []
    for c in range(n_clients):
        rows = [i for i, k in enumerate(task.columns["qtype"]) if k == kinds[c % 3]][:per_client]
        folder = root / f"client_{c}"
        (folder / "images").mkdir(parents=True)
        lines = []
        for i in rows:
            src = Path(task.images[i])
            shutil.copy(src, folder / "images" / src.name)
            lines.append({"image": f"images/{src.name}", "question": task.texts[i], "answer": task.targets[i]})
        (folder / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        files.append(str(folder))
    return files


def silo_config(tmp_path, files, method="fedit") -> dict:
    return tiny_config(tmp_path, model={"name": "tiny-llava", "max_length": 80}, task={"name": "vqa"},
                       method={"name": method}, partition={"num_clients": len(files or [0, 0, 0]), "scheme": "files",
                                                           "files": files},
                       train={"local_steps": 1, "batch_size": 4}, eval=EVAL)


def test_jsonl_silos_in_process(tmp_path):
    files = write_vqa_silos(tmp_path / "silos")
    cfg = build_config(silo_config(tmp_path, files, "celora"))
    sim = Simulation(cfg, tmp_path / "run")
    assert sim.vlm is not None and len(sim.client_train[0].images) == len({*sim.task.images})
    sim.driver.drive()
    assert sim.history[-1]["round"] == 2 and sim.history[0]["up_raw_other"] > 0  # the descriptor, counted
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples_round_2.jsonl").read_text().splitlines()]
    assert samples and all(Path(s["image"]).is_file() and str(tmp_path / "silos") in s["image"] for s in samples)
    assert (tmp_path / "run" / "vqa_samples_round_2.png").stat().st_size > 1000  # the picture of the answers


def test_missing_image_names_path_and_line(tmp_path):
    folder = Path(write_vqa_silos(tmp_path, 1, 3)[0])
    lines = (folder / "data.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "image": "images/gone.png"})
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: image '.*gone\.png' not found"):
        load_task("vqa", path=str(folder))


def test_hf_dataset_with_image_column(tmp_path):
    from datasets import Dataset, Image

    folder = Path(write_vqa_silos(tmp_path, 1, 6)[0])
    rows = [json.loads(x) for x in (folder / "data.jsonl").read_text().splitlines()]
    ds = Dataset.from_dict({"picture": [str(folder / r["image"]) for r in rows],
                            "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})
    ds.cast_column("picture", Image()).save_to_disk(str(tmp_path / "hf"))
    task = load_task("vqa", path=str(tmp_path / "hf"), image_column="picture")
    assert len(task.images) == 6 and isinstance(task.images[0], dict) and task.targets == [r["answer"] for r in rows]
    from fedlora.data.images import decode_images

    index, store = decode_images(task.images, 32)
    assert store.shape == (6, 3, 32, 32) and np.array_equal(index.numpy(), np.arange(6))
    ds.save_to_disk(str(tmp_path / "no_image"))  # the column holds strings, not an Image feature
    with pytest.raises(ValueError, match="column 'picture' .* holds no image"):
        load_task("vqa", path=str(tmp_path / "no_image"), image_column="picture")


def test_flower_image_silos_equal_in_process(tmp_path):
    """A real SuperLink and three SuperNodes, each holding only its own images and JSONL: bit-equal to in process."""
    pytest.importorskip("flwr")
    from test_flower import Federation, assert_same_run, simulate

    files = write_vqa_silos(tmp_path / "silos")
    fed = Federation(tmp_path / "fed")
    try:
        fed.start_superlink()
        for i, f in enumerate(files):
            fed.start(f"supernode{i}", ["supernode", "--partition-id", str(i), "--num-partitions", "3", "--data", f,
                                        "--superlink", fed.address, "--root-certificates", str(fed.certs["ca"]),
                                        "--state-dir", str(fed.state_dir), "--threads", "1"])
        cfg = silo_config(tmp_path, None)
        cfg["threads"] = 1
        flower_dir = fed.run(cfg, tmp_path / "flower")
    finally:
        fed.stop()
    assert_same_run(flower_dir, simulate({**cfg, "partition": {**cfg["partition"], "files": files}},
                                         tmp_path / "sim"))


def test_python_api_takes_a_vlm_object_and_its_processor(tmp_path):
    from transformers import CLIPImageProcessor, LlavaProcessor

    import fedlora
    from fedlora.vision.vlm import load_vlm

    vlm = load_vlm("tiny-llava", 0)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=vlm.tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1,  # CLIP's CLS
                               chat_template=vlm.tokenizer.chat_template)
    files = write_vqa_silos(tmp_path / "silos", per_client=8)
    result = fedlora.federate(model=vlm.model, processor=processor, clients=files, method="fedit",
                              run_dir=tmp_path / "run", federation={"rounds": 1}, eval=EVAL,
                              config={"model": {"max_length": 80}}, train={"local_steps": 1, "batch_size": 4})
    assert any(k.endswith(".A") and "language_model" in k for k in result.adapters[0])
    assert any(k.startswith("model.multi_modal_projector") for k in result.adapters[0])
