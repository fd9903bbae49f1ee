"""Learning curves of active-learning runs (``ntk-tutorial al-plot``): accuracy vs labels with
95% t-intervals over seeds, the area under each curve, and every run's difference to a baseline
paired by seed (the seeds share initial labels, network and candidate subsets), with its interval.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import stats
from .run import ALConfig, ResultsError, _comparable, read_results, run_name


def load_curves(out_dir: str | os.PathLike) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{run name: {seed: (n_labelled, accuracy)}}`` from every ``*.jsonl`` of a folder.

    Runs are named by :func:`~ntk_tutorial.active.run.run_name` (strategy and variant).  Seeds of
    one run name written with different settings are refused, naming the files: averaging them
    would mix experiments.
    """
    curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    settings: dict[str, tuple[dict, Path]] = {}
    files = sorted(Path(out_dir).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl results in {out_dir}; run `ntk-tutorial al --out {out_dir}` first")
    for f in files:
        recs = read_results(f)
        if not recs:
            continue
        cfg = ALConfig.from_dict({k: v for k, v in recs[0]["config"].items()})
        name, seed = run_name(cfg), int(recs[0]["seed"])
        key = {k: v for k, v in _comparable(cfg.to_dict()).items() if k != "seed"}
        if name in settings and settings[name][0] != key:
            other = settings[name][0]
            diff = sorted(k for k in set(key) | set(other) if key.get(k) != other.get(k))
            raise ResultsError(
                f"{f.name} and {settings[name][1].name} are seeds of run {name!r} written with different "
                f"settings ({', '.join(f'{k}: {other.get(k)!r} vs {key.get(k)!r}' for k in diff)}); move one "
                "of them to another folder")
        settings.setdefault(name, (key, f))
        curves.setdefault(name, {})[seed] = (
            np.array([r["n_labelled"] for r in recs], float), np.array([r["accuracy"] for r in recs], float))
    return curves


def _aligned(by_seed: dict, seeds=None, length=None):
    seeds = sorted(by_seed) if seeds is None else seeds
    length = min(len(by_seed[s][0]) for s in seeds) if length is None else length
    labels = by_seed[seeds[0]][0][:length]
    return seeds, labels, np.stack([by_seed[s][1][:length] for s in seeds])


def _auc(acc: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Area under the curve over the label range (a mean accuracy), per row of ``acc``."""
    span = labels[-1] - labels[0]
    if span <= 0:
        return acc[..., 0]
    return np.trapezoid(acc, labels, axis=-1) / span


def summarise(curves) -> list[dict]:
    """Per run: labels, mean accuracy, 95% half-width (Student t over seeds), AUC, seeds.

    Seeds are cut to their common number of cycles.  AUC is the trapezoid area under each seed's
    curve divided by the label range (a mean accuracy; the accuracy itself for one cycle),
    averaged over seeds.
    """
    rows = []
    for name, by_seed in sorted(curves.items()):
        seeds, labels, acc = _aligned(by_seed)
        mean, half = stats.t_interval(acc)
        aucs = _auc(acc, labels)
        auc_mean, auc_half = stats.t_interval(aucs)
        rows.append(dict(strategy=name, seeds=len(seeds), seed_list=seeds, labels=labels, mean=mean,
                         half_width=half, auc=float(auc_mean), auc_half_width=float(auc_half),
                         final=float(mean[-1]), per_seed_auc=aucs, per_seed_final=acc[:, -1]))
    return rows


def paired_differences(curves, baseline: str = "random") -> list[dict]:
    """Every run minus ``baseline``, paired by seed over the seeds both have.

    Per run: the per-cycle mean difference and its 95% t-interval, and :class:`stats.Paired`
    comparisons of the area under the curve and of the final accuracy."""
    if baseline not in curves:
        return []
    out = []
    for name, by_seed in sorted(curves.items()):
        if name == baseline:
            continue
        common = sorted(set(by_seed) & set(curves[baseline]))
        if not common:
            continue
        length = min(min(len(by_seed[s][0]) for s in common), min(len(curves[baseline][s][0]) for s in common))
        _, labels, acc = _aligned(by_seed, common, length)
        _, labels_b, acc_b = _aligned(curves[baseline], common, length)
        if not np.array_equal(labels, labels_b):
            raise ResultsError(f"{name} and {baseline} have different label counts per cycle; they are not "
                               "the same protocol")
        d_mean, d_half = stats.t_interval(acc - acc_b)
        out.append(dict(strategy=name, baseline=baseline, seeds=common, labels=labels, mean=d_mean,
                        half_width=d_half, auc=stats.paired(_auc(acc, labels), _auc(acc_b, labels)),
                        final=stats.paired(acc[:, -1], acc_b[:, -1])))
    return out


def format_table(rows: list[dict], diffs: list[dict] | None = None) -> str:
    width = max([len(r["strategy"]) for r in rows] + [8])
    by_name = {d["strategy"]: d for d in diffs or []}
    base = next(iter(by_name.values()))["baseline"] if by_name else None
    head = f"{'run':<{width}}  seeds  cycles  final acc  AUC (mean acc)  95% +-"
    if base:
        head += f"  AUC - {base} (paired, 95% t)         final - {base}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: -r["auc"]):
        line = (f"{r['strategy']:<{width}}  {r['seeds']:5d}  {len(r['labels']):6d}  {r['final']:9.4f}  "
                f"{r['auc']:14.4f}  {r['auc_half_width']:6.4f}")
        if r["strategy"] in by_name:
            d = by_name[r["strategy"]]
            a, f = d["auc"], d["final"]
            line += f"  {a.mean:+.4f} [{a.low:+.4f}, {a.high:+.4f}] {a.wins}/{a.n}  {f.mean:+.4f} [{f.low:+.4f}, {f.high:+.4f}]"
        lines.append(line)
    return "\n".join(lines)


def plot_curves(out_dir: str | os.PathLike, output: str | os.PathLike | None = None, baseline: str = "random"):
    """Draw the curves (and, when ``baseline`` ran, each run's paired difference to it) to
    ``output`` (default ``out_dir/al_curves.png``, with ``.json`` numbers).

    Returns ``(png path, rows, diffs)``.
    """
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    from ..provenance import jsonable, record

    curves = load_curves(out_dir)
    rows, diffs = summarise(curves), paired_differences(curves, baseline)
    fig, axes = plt.subplots(1, 2 if diffs else 1, figsize=(11 if diffs else 6, 4), squeeze=False)
    draw_curves(axes[0, 0], rows)
    if diffs:
        draw_differences(axes[0, 1], diffs)
    fig.tight_layout()
    png = Path(output) if output else Path(out_dir) / "al_curves.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    payload = {**record(), "rows": jsonable(rows),
               "differences": jsonable([{**d, "auc": d["auc"].as_dict(), "final": d["final"].as_dict()}
                                         for d in diffs])}
    png.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return png, rows, diffs


def draw_curves(ax, rows, colors=None) -> None:
    """Mean accuracy vs labels with 95% t-bands, one line per run."""
    for i, r in enumerate(rows):
        color = (colors or {}).get(r["strategy"], f"C{i % 10}")
        style = dict(ls="--", color="k") if r["strategy"] == "random" else dict(color=color)
        line, = ax.plot(r["labels"], r["mean"], marker="o", ms=3, label=f"{r['strategy']} (n={r['seeds']})", **style)
        ax.fill_between(r["labels"], r["mean"] - r["half_width"], r["mean"] + r["half_width"],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("number of labels")
    ax.set_ylabel("test accuracy")
    ax.set_title("mean and 95% t-interval over seeds")
    ax.legend(fontsize=7)


def draw_differences(ax, diffs, colors=None) -> None:
    """Per-cycle paired difference to the baseline with its 95% t-band, and zero."""
    for i, d in enumerate(diffs):
        color = (colors or {}).get(d["strategy"], f"C{i % 10}")
        line, = ax.plot(d["labels"], d["mean"], marker="o", ms=3, color=color,
                        label=f"{d['strategy']}: AUC {d['auc'].mean:+.3f} [{d['auc'].low:+.3f}, {d['auc'].high:+.3f}]")
        ax.fill_between(d["labels"], d["mean"] - d["half_width"], d["mean"] + d["half_width"],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(0.0, color="k", lw=1, ls="--")
    ax.set_xlabel("number of labels")
    ax.set_ylabel(f"accuracy - {diffs[0]['baseline']} (same seed)")
    ax.set_title("paired difference, 95% t-interval")
    ax.legend(fontsize=7)


__all__ = ["load_curves", "summarise", "paired_differences", "format_table", "plot_curves",
           "draw_curves", "draw_differences", "ResultsError"]
