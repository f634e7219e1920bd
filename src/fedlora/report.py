"""Tables and plots from run directories (`metrics.jsonl` + `summary.json`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return summary, rows


def head_bytes_per_upload(rows: list[dict]) -> float:
    """Mean raw head bytes in one client's upload over a run's rounds (0 with personal heads)."""
    n_up = sum(len(r["clients"]) - len(r["dropped"]) for r in rows)
    return sum(r["up_raw_head"] for r in rows) / max(1, n_up)


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def group_by_method(runs: list[tuple[dict, list[dict]]]) -> dict[str, list[tuple[dict, list[dict]]]]:
    out: dict[str, list] = defaultdict(list)
    for summary, rows in runs:
        out[summary["method"]].append((summary, rows))
    return dict(out)


def quality_key(runs: list[tuple[dict, list[dict]]]) -> tuple[str, bool]:
    """The metric a comparison ranks by, and whether higher is better: personal accuracy, or perplexity for an LM."""
    if any(s.get("personal_accuracy") is not None for s, _ in runs):
        return "personal_accuracy", True
    return "personal_perplexity", False


def difference_call(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> tuple[float, float | None]:
    """mean(a) − mean(b) and two standard errors of that difference, 2·sqrt(s_a²/n_a + s_b²/n_b) with sample
    stds; None when either side has one value (no call can be made). A win needs |difference| > 2 SE."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, None
    return diff, 2.0 * float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def call_text(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> str:
    """'+0.012 (within 2 SE = 0.020)', '+0.050 (beyond 2 SE = 0.020)' or '+0.010 (1 seed: no call)'."""
    diff, two_se = difference_call(a, b)
    if two_se is None:
        return f"{diff:+.3f} (1 seed: no call)"
    return f"{diff:+.3f} ({'beyond' if abs(diff) > two_se else 'within'} 2 SE = {two_se:.3f})"


def late_gain(points: list[tuple[int, float]], fraction: float = 0.2) -> tuple[float, int] | None:
    """How much a curve still gains over its last `fraction` of rounds: value at the final round minus the
    value at the latest evaluated round r0 <= (1 - fraction) * T, with r0 (so the window is at least that
    long). None without such a point. A curve has flattened when the gain is below one point (0.01)."""
    points = sorted(points)
    if not points:
        return None
    final_round, final = points[-1]
    earlier = [(t, v) for t, v in points if t <= (1 - fraction) * final_round]
    if not earlier:
        return None
    t0, v0 = earlier[-1]
    return float(final - v0), int(t0)


def late_gain_text(points: list[tuple[int, float]]) -> str:
    """'+0.045 since round 3 (rising)', '+0.004 since round 8 (flat)', '-0.062 since round 8 (falling)' or '–'
    (too few evaluated rounds). Flat is |gain| < one point: a curve that drops is not at its plateau either."""
    g = late_gain(points)
    if g is None:
        return "–"
    shape = "flat" if abs(g[0]) < 0.01 else ("rising" if g[0] > 0 else "falling")
    return f"{g[0]:+.3f} since round {g[1]} ({shape})"


def versus_best(groups: dict[str, list[tuple[dict, list[dict]]]], key: str, higher: bool) -> dict[str, str]:
    """Each method against the best mean: the difference, and whether it exceeds two standard errors of the
    difference, SE = sqrt(s_a²/n_a + s_b²/n_b) (sample std over seeds). Only then is it a win; one seed: never."""
    vals = {m: np.array([s[key] for s, _ in g if s.get(key) is not None], dtype=float) for m, g in groups.items()}
    vals = {m: v for m, v in vals.items() if len(v)}
    if not vals:
        return {}
    best = (max if higher else min)(vals, key=lambda m: vals[m].mean())
    return {m: "best" if m == best else call_text(v, vals[best]) for m, v in vals.items()}


def markdown_table(runs: list[tuple[dict, list[dict]]]) -> str:
    key, higher = quality_key(runs)
    groups = group_by_method(runs)
    vs = versus_best(groups, key, higher)
    head = ("| method | head | seeds | global accuracy | personalized accuracy | vs best (personal) | uplink MB "
            "| downlink MB | uplink / client / round: adapter B | head B | last-20% gain | wall s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for method, group in groups.items():
        s0, rows0 = group[0]
        head_per = [head_bytes_per_upload(rows) for _, rows in group]
        rounds, curve, _ = _curves(group, key)
        gain = late_gain_text(list(zip(rounds, curve, strict=True))) if higher else "–"
        lines.append(
            f"| {method} | {s0['head']} | {len(group)} | {mean_std([s['global_accuracy'] for s, _ in group])} "
            f"| {mean_std([s['personal_accuracy'] for s, _ in group])} | {vs.get(method, '–')} "
            f"| {np.mean([s['up_raw'] for s, _ in group]) / 1e6:.3f} "
            f"| {np.mean([s['down_raw'] for s, _ in group]) / 1e6:.3f} "
            f"| {np.mean([s['up_raw_adapter_per_client_round'] for s, _ in group]):,.0f} "
            f"| {np.mean(head_per):,.0f} | {gain} | {np.mean([s['wall_s'] for s, _ in group]):.0f} |")
    return "\n".join(lines)


def _curves(group, key: str):
    """Mean over seeds of `key` at the evaluated rounds, with cumulative uplink MB at those rounds."""
    per_round: dict[int, list] = defaultdict(list)
    up: dict[int, list] = defaultdict(list)
    for _, rows in group:
        for r in rows:
            if r.get(key) is not None:
                per_round[r["round"]].append(r[key])
                up[r["round"]].append(r["cum_up_raw"] / 1e6)
    rounds = sorted(per_round)
    return rounds, [np.mean(per_round[t]) for t in rounds], [np.mean(up[t]) for t in rounds]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int) -> dict:
    """A distinct marker and line style per method, so that methods with equal values stay visible."""
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "markersize": 7 - 2 * (i % 3), "alpha": 0.85}


def plot_runs(runs: list[tuple[dict, list[dict]]], out_dir: Path, key: str = "personal_accuracy") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    label = key.replace("_", " ")
    groups = group_by_method(runs)
    paths = []
    other = key.replace("personal_", "global_")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k in zip(axes, (other, key), strict=True):  # global beside personal
        for i, (method, group) in enumerate(groups.items()):
            rounds, acc, _ = _curves(group, k)
            if rounds:
                ax.plot(rounds, acc, label=method, **_style(i))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(k.replace("_", " "))
        ax.set_title(f"{k.replace('_', ' ')} vs round")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_round.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, group) in enumerate(groups.items()):
        _, acc, up = _curves(group, key)
        if up and max(up) > 0:  # methods that send nothing have no point on a log axis
            ax.plot(up, acc, label=method, **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink MB (all clients, log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs bytes sent")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_uplink.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_celora_weights(run_dir: Path, path: Path) -> Path | None:
    """Heatmap of CE-LoRA's aggregation weights w_ij in the run's last aggregated round, clients ordered by
    their dominant label (ties by id); None when the run saved no weight matrix."""
    saved = sorted(run_dir.glob("weights_round_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not saved:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.load(saved[-1])
    w, ids = z["weights"], z["clients"]
    dom = z["dominant_label"] if "dominant_label" in z else np.full(len(ids), -1)
    order = np.lexsort((ids, dom))
    w = w[np.ix_(order, order)]
    ticks = [f"{c} (y{d})" if d >= 0 else str(c) for c, d in zip(ids[order], dom[order], strict=True)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.32 * len(ids), 1.0 + 0.32 * len(ids)))
    im = ax.imshow(w, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(ids)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), ticks, fontsize=7)
    ax.set_xlabel("from client j (dominant label)")
    ax.set_ylabel("C̄ of client i")
    round_ = saved[-1].stem.rsplit("_", 1)[1]
    ax.set_title(f"CE-LoRA weights w_ij, round {round_}\nmean self {np.mean(np.diag(w)):.2f}, "
                 f"collaborators {np.mean(1 / np.sum(w**2, 1)):.1f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def celora_sections(run_dirs: list[Path], out_dir: Path) -> str:
    """Markdown for the weight heatmap of each CE-LoRA run (first seed of each)."""
    out = []
    for d in run_dirs:
        png = plot_celora_weights(d, out_dir / f"celora_weights_{d.name}.png")
        if png is not None:
            out.append(f"![CE-LoRA weights, {d.name}]({png.name})")
    return ("\n\nCE-LoRA's aggregation weights in the last round (row i: the weights of client i's C̄):\n\n"
            + "\n\n".join(out) + "\n") if out else ""


def write_report(run_dirs: list[Path], out_dir: Path, title: str, head: str | None = None) -> Path:
    runs = [read_run(d) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out_dir, quality_key(runs)[0])
    seeds = len(run_dirs) // max(1, len(group_by_method(runs)))
    policy = (f"Head policy: **{head}** for every federated method (local-only and centralized keep their own "
              "single model). " if head else "")
    text = (f"# {title}\n\n{len(run_dirs)} runs ({seeds} seed(s) per method; mean ± std over seeds, sample std). "
            + policy +
            "A difference is called a win only when it exceeds two standard errors of the difference "
            "(`vs best`). Uplink and downlink are raw tensor bytes over the whole run, the final downloads "
            "included; the per-client-per-round columns split adapter and head bytes. `last-20% gain`: what the "
            "mean personalized accuracy still gained over the last 20 % of rounds; a curve is flat below one "
            "point, and a claim from a rising curve is provisional.\n\n" + markdown_table(runs) +
            "\n\n![accuracy vs round](accuracy_vs_round.png)\n\n![accuracy vs uplink](accuracy_vs_uplink.png)\n"
            + celora_sections(run_dirs, out_dir))
    path = out_dir / "report.md"
    path.write_text(text)
    return path
