"""Learning curves of active-learning runs: accuracy vs labels, mean and 95% interval over seeds,
and the area under each curve (``ntk-tutorial al-plot``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .run import ResultsError, read_results


def load_curves(out_dir: str | os.PathLike) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{strategy: {seed: (n_labelled, accuracy)}}`` from every ``*.jsonl`` of a folder."""
    curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    files = sorted(Path(out_dir).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl results in {out_dir}; run `ntk-tutorial al --out {out_dir}` first")
    for f in files:
        recs = read_results(f)
        if not recs:
            continue
        strategy, seed = recs[0]["strategy"], int(recs[0]["seed"])
        mode = recs[0]["config"].get("mode", "batch")
        name = strategy if mode == "batch" else f"{strategy} ({mode})"
        curves.setdefault(name, {})[seed] = (
            np.array([r["n_labelled"] for r in recs], float), np.array([r["accuracy"] for r in recs], float))
    return curves


def summarise(curves) -> list[dict]:
    """Per strategy: labels, mean accuracy, 95% half-width (Student t over seeds), AUC.

    Seeds are cut to their common number of cycles.  AUC is the trapezoid area under the mean
    curve divided by the label range (a mean accuracy; the accuracy itself for one cycle).
    """
    from scipy import stats

    rows = []
    for name, by_seed in sorted(curves.items()):
        length = min(len(v[0]) for v in by_seed.values())
        labels = next(iter(by_seed.values()))[0][:length]
        acc = np.stack([v[1][:length] for v in by_seed.values()])
        mean = acc.mean(0)
        s = len(acc)
        half = (stats.t.ppf(0.975, s - 1) * acc.std(0, ddof=1) / np.sqrt(s)) if s > 1 else np.zeros(length)
        span = labels[-1] - labels[0]
        auc = float(np.trapezoid(mean, labels) / span) if span > 0 else float(mean[0])
        per_seed = [float(np.trapezoid(a, labels) / span) if span > 0 else float(a[0]) for a in acc]
        rows.append(dict(strategy=name, seeds=s, labels=labels, mean=mean, half_width=half, auc=auc,
                         auc_half_width=float(stats.t.ppf(0.975, s - 1) * np.std(per_seed, ddof=1) / np.sqrt(s))
                         if s > 1 else 0.0, final=float(mean[-1])))
    return rows


def format_table(rows: list[dict]) -> str:
    width = max([len(r["strategy"]) for r in rows] + [8])
    lines = [f"{'strategy':<{width}}  seeds  cycles  final acc  AUC (mean acc)  95% +-",
             f"{'-' * width}  -----  ------  ---------  --------------  ------"]
    for r in sorted(rows, key=lambda r: -r["auc"]):
        lines.append(f"{r['strategy']:<{width}}  {r['seeds']:5d}  {len(r['labels']):6d}  {r['final']:9.4f}  "
                     f"{r['auc']:14.4f}  {r['auc_half_width']:6.4f}")
    return "\n".join(lines)


def plot_curves(out_dir: str | os.PathLike, output: str | os.PathLike | None = None):
    """Draw the curves to ``output`` (default ``out_dir/al_curves.png``, with ``.json`` numbers).

    Returns ``(png path, rows)``.
    """
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    from ..plotting import _jsonable, versions

    rows = summarise(load_curves(out_dir))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        line, = ax.plot(r["labels"], r["mean"], marker="o", ms=3, label=f"{r['strategy']} (n={r['seeds']})")
        ax.fill_between(r["labels"], r["mean"] - r["half_width"], r["mean"] + r["half_width"],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("number of labels")
    ax.set_ylabel("test accuracy")
    ax.set_title("active learning: mean and 95% interval over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(output) if output else Path(out_dir) / "al_curves.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    png.with_suffix(".json").write_text(json.dumps({"versions": versions(), "rows": _jsonable(rows)}, indent=1))
    return png, rows


__all__ = ["load_curves", "summarise", "format_table", "plot_curves", "ResultsError"]
