"""The report's picture of a VLM's answers: a grid of images with question, reference and answer."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path


def sample_grid(samples: list[dict], out: str | Path, columns: int = 4, title: str = "") -> Path | None:
    """A PNG of up to 4 rows × `columns` samples (those that name an image file); None when none does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ..train import normalise_answer

    shown = [s for s in samples if isinstance(s.get("image"), str) and Path(s["image"]).is_file()][: 4 * columns]
    if not shown:
        return None
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown, strict=False):
        with Image.open(s["image"]) as img:
            ax.imshow(img.convert("RGB"))
        lines = [x for x in s["prompt"].splitlines() if x.strip() and x.strip() not in ("assistant", "user", "system")]
        question = lines[-1] if lines else ""  # the chat template's last user line
        ok = normalise_answer(s["answer"]) == normalise_answer(s["reference"])
        label = f"Q: {question}\nref: {s['reference']}\nans: {s['answer'][:30]}" + (" ✓" if ok else " ✗")
        ax.set_title("\n".join(textwrap.fill(x, 34) for x in label.splitlines()), fontsize=8,
                     color="darkgreen" if ok else "darkred")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def run_grid(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """The grid of a run's last samples file (samples_round_*.jsonl)."""
    files = sorted(Path(run_dir).glob("samples_round_*.jsonl"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not files:
        return None
    samples = [json.loads(x) for x in files[-1].read_text().splitlines() if x.strip()]
    return sample_grid(samples, out or Path(run_dir) / "vqa_samples.png", title=Path(run_dir).name)
