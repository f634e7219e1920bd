"""`fedlora` command line: run, simulate, tasks, export, demo."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .runtime.flower_cli import flower_app
from .runtime.flower_simulation import simulate

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning with LoRA-family adapters.")
console = Console()
STATE = {"debug": False}
app.add_typer(flower_app, name="flower")
app.command()(simulate)  # Flower's Simulation Engine (Ray): runtime/flower_simulation.py


def fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    # the hub stays reachable (HF_HUB_OFFLINE is the user's choice): an unreachable model or dataset is one line
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()  # its retry warnings would bury the one-line error
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _guard(fn, *args, **kwargs):
    """Known input errors become one line and exit code 2; --debug shows the traceback."""
    from .config import ConfigError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        if STATE["debug"]:
            raise
        fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    STATE["debug"] = debug


def fmt_mb(b: float) -> str:
    return f"{b / 1e6:.3f}"


def run_with_progress(cfg, run_dir: Path | None = None, resume: bool = False) -> dict:
    from .runtime.simulation import Simulation

    sim = Simulation(cfg, run_dir)
    with Progress(TextColumn(f"[bold]{cfg.name}[/bold] ({cfg.method.name})"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("rounds", total=cfg.federation.rounds, info="")
        if resume:
            bar.update(task, description="resumed")

        def on_round(row: dict) -> None:
            info = ""
            if "global_accuracy" in row:
                info = f"global {row['global_accuracy']:.3f}  personal {row['personal_accuracy']:.3f}"
            bar.update(task, advance=1, info=info)

        summary = sim.run(on_round, resume=resume)
    summary["run_dir"] = str(sim.run_dir)
    return summary


def summary_table(rows: list[dict], title: str = "results") -> Table:
    """Accuracy columns for classification; perplexity and ROUGE-L for a causal LM."""
    lm = rows[0].get("global_accuracy") is None and "personal_perplexity" in rows[0]
    quality = (("global_perplexity", "global ppl"), ("personal_perplexity", "personal ppl"),
               ("personal_rouge_l", "personal ROUGE-L")) if lm else \
        (("global_accuracy", "global acc"), ("personal_accuracy", "pers. acc"))
    table = Table(title=title)
    for col in ("method", *(c for _, c in quality), "up MB", "down MB", "adapter up B/client/round", "wall s"):
        table.add_column(col, justify="right" if col != "method" else "left")

    def num(x) -> str:
        return "–" if x is None else f"{x:.3f}"

    for s in rows:
        table.add_row(s["method"], *(num(s.get(k)) for k, _ in quality), fmt_mb(s["up_raw"]), fmt_mb(s["down_raw"]),
                      f"{s['up_raw_adapter_per_client_round']:,.0f} B", f"{s['wall_s']:.0f}")
    return table


def check_resumable(cfg, run_dir: Path) -> None:
    """The sweep engine's rule for a changed config (fedlora.sweep): only what changes no result may differ."""
    from .sweep import refused_changes

    changed = refused_changes(cfg, run_dir)
    if changed is None:
        fail(f"--resume: not a run directory (no config.yaml): {run_dir}")
    if changed:
        fail(f"--resume: the config differs from the run's in {', '.join(changed)}")


@app.command()
def run(config: Path = typer.Argument(..., help="YAML config"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.lr=3e-4"),
        out: Path | None = typer.Option(None, "--out", help="run directory (default runs/<name>)"),
        resume: Path | None = typer.Option(None, "--resume", help="continue this run directory")) -> None:
    """Run one federated training from a YAML config."""
    from .config import load_config

    _quiet_libraries()
    cfg = _guard(load_config, config, set_)
    if resume is not None:
        check_resumable(cfg, resume)
    run_dir = resume or out or Path(cfg.output.dir) / cfg.name
    try:
        summary = _guard(run_with_progress, cfg, run_dir, resume is not None)
    except KeyboardInterrupt:
        console.print(f"interrupted: the last complete round is checkpointed in {run_dir}\n"
                      f"resume with: fedlora run {config} --resume {run_dir}")
        raise typer.Exit(130) from None
    console.print(summary_table([summary], title=cfg.name))
    console.print(f"run directory: {summary['run_dir']}")


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from .data import DESCRIPTIONS

    table = Table(title="tasks")
    table.add_column("name")
    table.add_column("description")
    for name, desc in sorted(DESCRIPTIONS.items()):
        table.add_row(name, desc)
    table.add_row("csv / jsonl / file", "your file: task.path, task.text_column, task.label_column")
    table.add_row("hf", "Hugging Face datasets: task.path = hub id, folder, save_to_disk folder, parquet/arrow/json")
    table.add_row("instructions", "your JSONL instructions: instruction, input, output, category")
    console.print(table)


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a run directory"),
           client: str = typer.Option("global", "--client", help="client id, or 'global'"),
           out: Path = typer.Option(..., "--out", help="output folder")) -> None:
    """Export a client's (or the global) adapter as a PEFT LoRA folder."""
    from safetensors.torch import load_file

    from .adapters import export_with_meta
    from .models import resolve_model_path

    meta_path = run_dir / "adapter_meta.json"
    if not meta_path.is_file():
        fail(f"not a run directory (no adapter_meta.json): {run_dir}")
    meta = json.loads(meta_path.read_text())
    name = "global.safetensors" if client == "global" else f"client_{client}.safetensors"
    path = run_dir / "states" / name
    if not path.is_file():
        hint = "this method has no single global model; pass --client ID" if client == "global" else \
            f"clients are 0..{meta['num_clients'] - 1}"
        fail(f"no state file {path} ({hint})")
    base = meta["model"] if meta["model"] == "tiny-bert" else _guard(resolve_model_path, meta["model"])
    _guard(export_with_meta, load_file(str(path)), out, meta, base)
    console.print(f"wrote PEFT adapter to {out}")


@app.command()
def compare(config: Path = typer.Argument(..., help="base YAML config"),
            methods: str = typer.Option("fedit,ffa,rolora,fedsa,celora,local,centralized",
                                        help="comma-separated (also hetlora, flexlora, flora, fedex)"),
            seeds: int = typer.Option(3, help="training seeds per method (0, 1, ...), on one data split"),
            head: str = typer.Option("personal", "--head", help="head policy for every method: shared | personal"),
            set_: list[str] = typer.Option([], "--set", help="override for every run"),
            out: Path | None = typer.Option(None, "--out", help="output folder (default compare/<name>)"),
            overwrite: bool = typer.Option(False, "--overwrite",
                                           help="rerun runs whose stored config differs from this one")) -> None:
    """Run the same task, partition and budget for each method and seed; write report.md and plots.

    Fair by construction: one head policy for all, the data split fixed across seeds (`data_seed`),
    centralized given the federation's total steps, and a stored run reused or continued only under the
    sweep engine's rule (fedlora.sweep: only what changes no result may differ)."""
    import yaml

    from .config import load_config
    from .report import write_report
    from .sweep import Arm, run_sweep

    _quiet_libraries()
    if head not in ("shared", "personal"):
        fail(f"--head: expected shared or personal, got '{head}'")
    base = _guard(load_config, config, set_)
    out = out or Path("compare") / base.name
    names = [m.strip() for m in methods.split(",") if m.strip()]
    arms = [Arm(m, [*set_, f"method.name={m}", f"method.head={head}"]) for m in names]
    result = _guard(run_sweep, arms, out, base=yaml.safe_load(config.read_text()) or {}, seeds=seeds,
                    label="{arm}-s{seed}", overwrite=overwrite, hint="use --overwrite to rerun it or another --out",
                    runner=run_with_progress, log=lambda line: console.print(line, markup=False, highlight=False))
    report = write_report(result.run_dirs, out, f"{base.name}: {base.task.name}, {base.partition.num_clients} "
                                                f"clients, {base.partition.scheme}", head=head)
    console.print(report.read_text().split("\n\n")[2])
    console.print(f"report: {report}")


@app.command()
def demo(config: Path = typer.Option(Path(__file__).parent / "configs" / "demo.yaml", help="base config"),
         methods: str = typer.Option("fedit,rolora", help="comma-separated methods"),
         set_: list[str] = typer.Option([], "--set", help="override, e.g. --set federation.rounds=2")) -> None:
    """Default: MiniLM on rt-sentiment, 10 non-IID clients, FedIT vs RoLoRA; then a table."""
    from .config import load_config

    _quiet_libraries()
    rows, cfg = [], None
    for i, m in enumerate(methods.split(",")):
        once = ["eval.baseline=false"] if i else []  # the base model (ΔW = 0) is the same for every method
        cfg = _guard(load_config, config, [*set_, *once, f"method.name={m}", f"name={_config_name(config)}-{m}"])
        rows.append(_guard(run_with_progress, cfg))
    console.print(summary_table(rows, title=f"{cfg.name.rsplit('-', 1)[0]}: {cfg.task.name}, {cfg.model.name}, "
                                            f"{cfg.partition.num_clients} clients, {cfg.partition.scheme}"))
    if cfg.task.name == "rt-sentiment":
        console.print("majority-class accuracy on rt-sentiment: 0.578 (fresh)")
    base = next((s["baseline"] for s in rows if "baseline" in s), {})  # measured once, with the first method
    for s in rows:
        if "client_perplexity" in base and "client_perplexity" in s:
            before, after = base["client_perplexity"], s["client_perplexity"]
            better = sum(a < b for a, b in zip(after, before, strict=True))
            console.print(f"{s['method']}: personalized perplexity {base['personal_perplexity']:.2f} "
                          f"(base model) -> {s['personal_perplexity']:.2f}; lower on {better}/{len(before)} clients")
    if any("personal_exact_match" in s or "global_exact_match" in s for s in rows) and cfg.task.name in (
            "easy-vqa", "vqa"):
        vqa_table(rows)
    samples = Path(rows[-1]["run_dir"]).glob("samples_round_*.jsonl")
    for path in sorted(samples)[-1:]:
        first = json.loads(path.read_text().splitlines()[0])
        console.print(f"sample answer ({rows[-1]['method']}): Q: {first['prompt'].splitlines()[-2]!r}\n"
                      f"  A: {first['answer']!r}\n  reference: {first['reference']!r}", soft_wrap=True)


def vqa_table(rows: list[dict]) -> None:
    """A VLM demo's table: VQA accuracy (exact match of the greedy answer) of the starting model and of each
    method, personalized and global, with the bytes sent; and each run's picture of its last answers."""
    from rich.table import Table

    from .vision.grid import run_grid

    table = Table(title="VQA accuracy (exact match of the generated answer)")
    for col in ("model", "personalized", "global", "uplink MB", "picture"):
        table.add_column(col)

    def fmt(x) -> str:
        return "-" if x is None else f"{x:.3f}"

    base = next((s["baseline"] for s in rows if "baseline" in s), None)
    if base:
        table.add_row("starting model", fmt(base.get("personal_exact_match")), fmt(base.get("global_exact_match")),
                      "0", "")
    for s in rows:
        pic = run_grid(s["run_dir"])
        table.add_row(s["method"], fmt(s.get("personal_exact_match")), fmt(s.get("global_exact_match")),
                      f"{s.get('up_raw', 0) / 1e6:.2f}", str(pic or ""))
    console.print(table)


@app.command()
def attack(config: Path = typer.Argument(..., help="YAML config (classification task)"),
           method: str = typer.Option(..., "--method", help="method whose upload is attacked, or 'full'"),
           batch_size: str = typer.Option("1,4,8", "--batch-size", help="comma-separated batch sizes"),
           batches: int = typer.Option(4, "--batches", help="batches attacked per batch size (client 0)"),
           steps: int = typer.Option(500, help="inversion optimization steps"),
           optimizer: str = typer.Option("sgd", help="the client's step: sgd | adamw"),
           search: int = typer.Option(30, help="discrete search proposals on the real-token objective"),
           task_vocab: bool = typer.Option(False, help="decode among the task's tokens only (attacker prior)"),
           out: Path = typer.Option(Path("attack.json"), help="JSON with every batch's metrics"),
           overrides: list[str] = typer.Option([], "--set", help="key=value config overrides")) -> None:
    """The server's gradient-inversion attack on one client's one-step upload: token P/R/F1, ROUGE-L."""
    _quiet_libraries()
    from .config import load_config

    cfg = _guard(load_config, config, [*overrides, f"method.name={'fedit' if method == 'full' else method}"])

    def go() -> list[dict]:
        import numpy as np
        import torch

        from .privacy.attack import attack_client
        from .runtime.simulation import Simulation

        sim = Simulation(cfg)
        vocab = torch.unique(torch.cat([d.input_ids.flatten() for d in sim.client_train])) if task_vocab else None
        rows = []
        for b in [int(x) for x in batch_size.split(",") if x.strip()]:
            runs = [attack_client(sim, method, 0, b, i, optimizer, steps, vocab=vocab, seed=i, search=search)
                    for i in range(batches)]
            row = {"method": method, "batch_size": b, "batches": len(runs), "runs": runs}
            row |= {k: float(np.mean([r[k] for r in runs])) for k in ("precision", "recall", "f1", "rouge_l")}
            rows.append(row)
        return rows

    rows = _guard(go)
    table = Table(title=f"gradient inversion ({optimizer} step)")
    for col in ("method", "batch", "token P", "token R", "token F1", "ROUGE-L"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], str(r["batch_size"]), *(f"{r[k]:.3f}" for k in ("precision", "recall", "f1",
                                                                                     "rouge_l")))
    console.print(table)
    out.write_text(json.dumps(rows, indent=2))
    console.print(f"wrote {out}")


def _config_name(config: Path) -> str:
    import yaml

    return (yaml.safe_load(Path(config).read_text()) or {}).get("name", "demo")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
