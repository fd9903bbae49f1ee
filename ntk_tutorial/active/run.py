"""The active-learning experiment runner: one (strategy, seed) at a time, resumable.

``run_experiment(config, out_dir)`` runs ``config.cycles`` cycles of

1. train the network on the labelled set (warm start from the previous cycle; square loss on
   one-hot labels by default, as the paper, ``loss="xent"`` as an option),
2. evaluate test accuracy,
3. score a random subset S of ``config.subset`` unlabelled points and query ``config.query`` of
   them, in one of three modes:

   * ``"batch"``: the strategy's top-b (or its own batch rule: BADGE, coreset, random);
   * ``"sequential"``: labels added one at a time through the retraining proxy
     (:func:`lookahead.sequential_update`), the network retrained by SGD every
     ``retrain_every`` labels (the paper's "sequential querying"; look-ahead strategies only);
   * ``"hybrid"``: the same with ``step`` labels per proxy update (top-``step``).

Every cycle appends one JSON line to ``out_dir/<run name>_seed<k>.jsonl`` (:func:`run_name`: the
strategy and what differs from the released protocol; full configuration,
seed, labelled indices, queried indices, accuracy, timings, package versions) and saves the
trained parameters of the cycle beside it (``<strategy>_seed<k>.cycleNNN.npz``).  Running again
resumes after the last complete cycle: the labelled set and the warm-start parameters are
restored, every random choice is derived from ``(seed, cycle)``, so an interrupted run continues
exactly as an uninterrupted one would have.  A corrupt file or a different configuration raises
:class:`ResultsError` saying what to do.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels as _kernels
from .. import lookahead
from . import strategies as _s

MODES = ("batch", "sequential", "hybrid")
# batch-norm running statistics after each cycle's training: recomputed on the labelled set
# with the final parameters, or the exponential moving averages of training
BN_STATS = ("recompute", "running")
# configuration fields that may differ between runs appending to the same file
NOT_COMPARED = ("cycles",)


class ResultsError(RuntimeError):
    """A results file that cannot be resumed (corrupt, or written with another configuration)."""


@dataclass(frozen=True)
class ALConfig:
    """One active-learning experiment (a strategy and a seed); see the module docstring.

    ``data_seed`` fixes the train/test split (the same for every seed); ``seed`` draws the
    initial labelled set, the initial network, the candidate subsets and SGD's shuffling.
    """

    dataset: str = "digits"
    strategy: str = "random"
    seed: int = 0
    init: int = 20
    query: int = 10
    subset: int = 300
    cycles: int = 5
    model: str = "mlp"
    hidden: tuple = (256,)
    stages: int = 1  # wrn: stages of the released Wide_ResNet (its num_layers)
    depth: int = 10  # wrn: depth 6n + 4, n blocks per stage
    widen: int = 20  # wrn: widening factor k (channels 16k, then 32k, 64k, 128k per stage)
    width: int = 64  # ResNet18: channels of the first stage
    dropout: float = 0.0
    loss: str = "mse"
    lr: float = 0.5
    epochs: int = 100
    batch_size: int | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    kernel: str = "pntk"
    ridge: float = 0.0
    mc_samples: int = 20
    relative_to: str | None = None  # None: "network" in batch mode, "proxy" otherwise (as released)
    proxy: str = "linearised"
    probabilities: str | None = None  # None: "simplex" for EMOC under the square loss, else softmax
    bn_stats: str = "recompute"
    mode: str = "batch"
    step: int = 1
    retrain_every: int = 0
    data_seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    normalize: str | None = None  # data.load's normalize= (None: the loader's default)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.relative_to is None:
            object.__setattr__(self, "relative_to", "network" if self.mode == "batch" else "proxy")
        if self.probabilities is None:
            object.__setattr__(self, "probabilities",
                               "simplex" if self.strategy == "emoc" and self.loss == "mse" else "softmax")
        for name, allowed in (("relative_to", _s.REFERENCES), ("proxy", _s.PROXIES),
                              ("probabilities", _s.PROBABILITIES), ("bn_stats", BN_STATS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.proxy != "linearised" and self.strategy not in _s.LOOKAHEAD:
            raise ValueError(f"proxy={self.proxy!r} is an approximation of retraining for the look-ahead "
                             f"strategies ({', '.join(_s.LOOKAHEAD)}), not for {self.strategy!r}")
        if self.proxy != "linearised" and self.mode != "batch":
            raise ValueError(f"proxy={self.proxy!r} runs in batch mode only; sequential querying "
                             "conditions the linearised network's posterior")
        _s.get(self.strategy)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.mode != "batch" and self.strategy not in _s.LOOKAHEAD:
            raise ValueError(
                f"mode={self.mode!r} adds labels through the retraining proxy: it needs a "
                f"look-ahead strategy ({', '.join(_s.LOOKAHEAD)}), not {self.strategy!r}; "
                "use mode='batch' for the others")
        if self.strategy == "bald" and not self.dropout > 0:
            raise ValueError("strategy 'bald' samples dropout masks (MC dropout): set dropout > 0, "
                             "e.g. --dropout 0.2 (the network is then trained with dropout too)")
        if self.kernel not in _s.KERNELS:
            raise ValueError(f"kernel must be one of {sorted(_s.KERNELS)}, got {self.kernel!r}")
        for name in ("init", "query", "subset", "cycles", "step"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.query > self.subset:
            raise ValueError(f"query ({self.query}) must not exceed subset ({self.subset})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ALConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# Paper protocols (Mohamadi, Bae & Sutherland 2022, Sec. 5), a CPU stand-in of the MNIST one with
# the paper's model family, and two fast demos.  PROVENANCE says where each setting comes from.
_RELEASED_SGD = dict(lr=0.3, momentum=0.9, weight_decay=1e-4, batch_size=128, epochs=200)
PRESETS: dict[str, dict] = {
    # tiny: the tests and quick looks (sklearn's 8x8 digits; raw pixels / 16)
    "cpu-digits": dict(dataset="digits", init=20, query=10, subset=300, cycles=5, hidden=(256,),
                       lr=2.0, epochs=200, normalize="none"),
    # the fast offline demo: an MLP on mnist-5k, full-batch GD (minutes for every strategy)
    "demo-mnist-5k": dict(dataset="mnist-5k", init=100, query=20, subset=4000, cycles=10,
                          hidden=(512, 512), lr=5.0, epochs=100, normalize="none"),
    # the paper's MNIST protocol on the offline digits with a narrow one-stage WRN (CPU hours)
    "cpu-mnist-5k": dict(dataset="mnist-5k", init=100, query=20, subset=4000, cycles=10, model="wrn",
                         stages=1, depth=10, widen=1, normalize="none", **_RELEASED_SGD),
    "mnist": dict(dataset="mnist", init=100, query=20, subset=4000, cycles=10, model="wrn", stages=1,
                  depth=10, widen=20, normalize="none", **_RELEASED_SGD),
    "svhn": dict(dataset="svhn", init=1000, query=1000, subset=6000, cycles=10, model="wrn", stages=1,
                 depth=10, widen=20, **_RELEASED_SGD),
    "cifar10": dict(dataset="cifar10", init=1000, query=1000, subset=6000, cycles=10, model="wrn",
                    stages=2, depth=10, widen=10, **_RELEASED_SGD),
    "cifar100": dict(dataset="cifar100", init=10000, query=1000, subset=6000, cycles=10,
                     model="resnet18", **_RELEASED_SGD),
}

# Where every setting of the paper presets comes from: "paper" (Sec. 5 of the paper), "released"
# (the authors' code, mohamad-amin/ntk-lookahead-active-learning: its defaults or its example
# config configs/cifar_resnet18.yml) or "ours" (a choice of this package, with the reason).
_PAPER_PROTOCOL = {
    "init": ("paper", "initial labels: 100 (MNIST), 1 000 (SVHN, CIFAR-10), 10 000 (CIFAR-100)"),
    "query": ("paper", "labels per cycle: 20 (MNIST), 1 000 (others)"),
    "subset": ("paper", "random pool subset scored per cycle: 4 000 (MNIST), 6 000 (others)"),
    "cycles": ("released", "10 (the released default; the paper's MNIST figures show 10 cycles)"),
    "mode": ("released", "batch top-b, no diversity term (the released default); sequential "
                         "querying (Sec. 5.3, Fig. 3a) is --mode sequential"),
    "step": ("released", "1: sequential querying picks one label at a time"),
    "retrain_every": ("released", "0: in sequential mode SGD retrains once per cycle"),
    "proxy": ("released", "the network linearised at its trained parameters (Eq. 11)"),
    "data_seed": ("ours", "the train/test split of the offline and downloaded sets"),
    "n_train": ("paper", "the whole training set is the pool"),
    "n_test": ("paper", "the whole test set"),
    "model": ("paper", "one-stage WRN (MNIST, SVHN), two-stage WRN (CIFAR-10), ResNet18 (CIFAR-100)"),
    "stages": ("paper", "'WideResNet with one or two layers' = the released code's num_layers"),
    "depth": ("ours", "not stated by the paper; 10 (one block per stage) is the smallest such network"),
    "widen": ("paper", "'maximum width of 640': k = 20 with one stage, 10 with two (64k = 640)"),
    "loss": ("released", "square loss on one-hot labels (criterion l2)"),
    "lr": ("released", "0.3 (example config); the released schedule is one-cycle (max 1.25), "
                       "ours constant: no schedule is implemented"),
    "momentum": ("released", "0.9"),
    "weight_decay": ("released", "1e-4"),
    "batch_size": ("released", "128"),
    "epochs": ("released", "200 per cycle (the released default), warm-started across cycles"),
    "kernel": ("released", "pNTK: sum of logits / sqrt(k) (apply_fn_trace, trace_axes [-1])"),
    "ridge": ("ours", "0 plus the smallest jitter that lets Cholesky succeed; the released code adds "
                      "1e-5 x mean diagonal from cycle 5 (+1e-5 per cycle), not implemented"),
    "relative_to": ("released", "batch: flips counted against the network's arg-max; sequential: "
                                "against the current proxy"),
    "probabilities": ("released", "simplex projection of square-loss outputs for EMOC"),
    "bn_stats": ("ours", "running statistics recomputed on the labelled set after training (the "
                         "released adjust_batchnorm_stats, default on in its code, off in its example "
                         "config, averages over the whole training set): with 100-300 labels the "
                         "moving averages lag and the network in evaluation mode fits L badly"),
    "normalize": ("released", "MNIST pixels in [0, 1] (mean 0, std 1); CIFAR/SVHN: the loader's "
                              "per-pixel standardisation, the released code uses per-channel means"),
    "dataset": ("paper", "full MNIST (60 000 pool, 10 000 test), SVHN, CIFAR-10, CIFAR-100; no "
                         "augmentation here (the released CIFAR config flips and crops)"),
}
PROVENANCE: dict[str, dict[str, tuple[str, str]]] = {
    "mnist": _PAPER_PROTOCOL, "svhn": _PAPER_PROTOCOL, "cifar10": _PAPER_PROTOCOL,
    "cifar100": {**_PAPER_PROTOCOL, "width": ("released", "64: ResNet18's standard widths")},
    "cpu-mnist-5k": {
        **_PAPER_PROTOCOL,
        "dataset": ("ours", "mnist-5k: the 5 000 real MNIST digits that ship offline (4 000 pool, "
                            "1 000 test) instead of full MNIST; subset 4 000 is then the whole pool"),
        "widen": ("ours", "1 (widths 16/32) instead of 20 (320/640), so that 6 seeds x 10 cycles of "
                          "MLMOC and random run on a 2-core CPU in hours; the paper's family"),
    },
    "demo-mnist-5k": {
        **_PAPER_PROTOCOL,
        "dataset": ("ours", "mnist-5k: the 5 000 real MNIST digits that ship offline (4 000 pool, "
                            "1 000 test); subset 4 000 is then the whole pool"),
        "model": ("ours", "an MLP 784-512-512-10, not the paper's network: the fast offline demo"),
        "hidden": ("ours", "two hidden layers of 512 (NTK parameterisation, ReLU)"),
        "lr": ("ours", "5 with full-batch GD on the mean square loss (at 0.5 the MLP does not fit L)"),
        "epochs": ("ours", "100 full-batch steps per cycle, warm-started"),
        "batch_size": ("ours", "full batch (GD): the labelled set is 100-280 points"),
        "momentum": ("ours", "plain GD"), "weight_decay": ("ours", "none"),
        "normalize": ("ours", "pixels in [0, 1]: standardising near-constant border pixels blows up"),
    },
    "cpu-digits": {"dataset": ("ours", "sklearn's 8x8 digits: a tiny set for tests and quick looks")},
}


def describe_preset(name: str) -> list[tuple[str, str, str, str]]:
    """``(field, value, source, note)`` for every configuration field of preset ``name``:
    ``source`` is ``"paper"``, ``"released"``, ``"ours"`` or ``"default"`` (a field the preset
    does not set and nobody chose: the :class:`ALConfig` default, or the strategy's own)."""
    cfg = config_from_preset(name).to_dict()
    notes = PROVENANCE.get(name, {})
    unused = {"strategy", "seed", "dropout", "mc_samples"}  # per run (BALD sets dropout)
    unused |= {"mlp": {"stages", "depth", "widen", "width", "bn_stats"}, "wrn": {"hidden", "width"},
               "resnet18": {"hidden", "stages", "depth", "widen"}}.get(cfg["model"], {"hidden", "stages",
                                                                                    "depth", "widen", "width"})
    shown = {"relative_to": "network in batch mode, proxy in sequential mode",
             "probabilities": "simplex for EMOC under the square loss, softmax otherwise"}
    rows = []
    for key, value in cfg.items():
        if key in unused:
            continue
        source, note = notes.get(key, ("default", ""))
        rows.append((key, shown.get(key, json.dumps(value)), source, note))
    return rows


README_PRESETS = ("demo-mnist-5k", "cpu-mnist-5k", "mnist", "svhn", "cifar10", "cifar100")
_SOURCE_MARK = {"paper": "P", "released": "R", "ours": "**O**", "default": ""}


def presets_markdown(names=README_PRESETS) -> str:
    """One table of the presets side by side (the README's): every setting, its value and where it
    comes from (P paper, R released code, **O** ours), then the reasons for the choices of ours."""
    described = {n: {k: (v, src, note) for k, v, src, note in describe_preset(n)} for n in names}
    keys = list(dict.fromkeys(k for n in names for k in described[n]))
    short = {"network in batch mode, proxy in sequential mode": "network (batch), proxy (sequential)",
             "simplex for EMOC under the square loss, softmax otherwise": "simplex for EMOC, else softmax",
             "null": "default"}
    lines = ["| setting | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = []
        for n in names:
            if key not in described[n]:
                cells.append("")
                continue
            v, src, _ = described[n][key]
            v = short.get(v, v).strip('"')
            cells.append(v + (f" {_SOURCE_MARK[src]}" if _SOURCE_MARK[src] else ""))
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    notes = []
    for key in keys:
        by_note: dict[str, list[str]] = {}
        for n in names:
            if key in described[n] and described[n][key][1] == "ours":
                by_note.setdefault(described[n][key][2], []).append(n)
        for note, where in by_note.items():
            scope = "" if len(where) == sum(key in described[n] for n in names) else " (" + ", ".join(where) + ")"
            notes.append(f"- `{key}`{scope}: {note}")
    return "\n".join(lines) + "\n\nOur choices (**O**), and why:\n\n" + "\n".join(notes)


def format_preset(name: str) -> str:
    """The table ``ntk-tutorial al --preset NAME --show`` prints (and the README shows)."""
    rows = describe_preset(name)
    lines = [f"preset {name}", "", "| setting | value | source | why |", "|---|---|---|---|"]
    lines += [f"| `{k}` | `{v}` | {src} | {note} |" for k, v, src, note in rows]
    return "\n".join(lines)


# mlp: MLP(hidden); cnn: the small CNN of ntk_tutorial.models; wrn: the released code's wide
# ResNet (models.LookaheadWRN: stages, depth, widen); resnet18: ResNet18 (first-stage channels = width)
MODELS = ("mlp", "cnn", "wrn", "resnet18")
IMAGE_MODELS = ("cnn", "wrn", "resnet18")


def config_from_preset(preset: str | None = None, **overrides) -> ALConfig:
    """An :class:`ALConfig` from a preset name and keyword overrides (``None`` values ignored)."""
    base: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = dict(PRESETS[preset])
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ALConfig.from_dict(base)


def run_name(config: ALConfig) -> str:
    """The name of a run's curve and file: the strategy, then ``+``-joined what differs from the
    released protocol's defaults (``mlmoc-flips+sequential``, ``mlmoc-flips+gp``,
    ``mlmoc+from-proxy``, ``mlmoc+entk``), so variants of one strategy share a results folder."""
    parts = [config.strategy]
    if config.mode == "sequential":
        parts.append("sequential")
    elif config.mode == "hybrid":
        parts.append(f"hybrid{config.step}")
    if config.retrain_every:
        parts.append(f"retrain{config.retrain_every}")
    if config.proxy != "linearised":
        parts.append(config.proxy)
    if config.relative_to != ("network" if config.mode == "batch" else "proxy"):
        parts.append(f"from-{config.relative_to}")
    if config.kernel != "pntk" and config.strategy in _s.LOOKAHEAD:
        parts.append(config.kernel)
    if config.probabilities != ("simplex" if config.strategy == "emoc" and config.loss == "mse" else "softmax"):
        parts.append(config.probabilities)
    return "+".join(parts)


def results_path(out_dir: str | os.PathLike, config: ALConfig | str, seed: int | None = None) -> Path:
    """``out_dir/<run name>_seed<k>.jsonl`` for a configuration (or a run name and a seed)."""
    if isinstance(config, ALConfig):
        name, seed = run_name(config), config.seed if seed is None else seed
    else:
        name = config
    return Path(out_dir) / f"{name}_seed{seed}.jsonl"


def _params_path(jsonl: Path, cycle: int) -> Path:
    return jsonl.with_name(f"{jsonl.stem}.cycle{cycle:03d}.npz")


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------


def build_model(config: ALConfig, in_dim: int, num_classes: int, image_shape=None):
    """``(apply_fn, params)`` of the configured model, initialised from ``config.seed``.

    Image models need ``image_shape`` ``(H, W, C)`` (the data set's ``image_shape``)."""
    from flax import nnx

    from .. import models

    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    rngs = nnx.Rngs(params=key)
    if config.model == "mlp":
        return models.functional(models.MLP((in_dim, *config.hidden, num_classes), dropout=config.dropout,
                                            rngs=rngs))
    if image_shape is None:
        raise ValueError(f"model {config.model!r} takes images, but data set {config.dataset!r} has no "
                         "image_shape; use model='mlp' for vector data")
    if config.model == "cnn":
        if config.dropout > 0:
            raise ValueError("the small CNN has no dropout; use a wide ResNet or ResNet18 for BALD")
        model = models.CNN(image_shape, num_classes, rngs=rngs)
    elif config.model == "wrn":
        model = models.LookaheadWRN(image_shape, num_classes, stages=config.stages, depth=config.depth,
                                    widen=config.widen, dropout=config.dropout, rngs=rngs)
    else:
        model = models.ResNet18(image_shape, num_classes, width=config.width, dropout=config.dropout,
                                rngs=rngs)
    return models.functional(model)


def load_data(config: ALConfig):
    from .. import data

    options = {k: v for k, v in (("n_train", config.n_train), ("n_test", config.n_test),
                                 ("normalize", config.normalize)) if v is not None}
    try:
        return data.load(config.dataset, seed=config.data_seed, **options)
    except Exception as err:  # remote sets need a download first
        if config.dataset in data.OFFLINE:
            raise
        raise RuntimeError(
            f"data set {config.dataset!r} could not be loaded ({err}); fetch it first with "
            f"`ntk-tutorial data fetch {config.dataset}` on a machine with a network, or place the "
            "files by hand where that error says") from err


def _state(apply_fn, params) -> tuple:
    """What a cycle saves: the parameters and the batch-norm statistics (``{}`` without)."""
    stats = getattr(apply_fn, "batch_stats", None)
    return (params, {} if stats is None else stats)


def _save_params(path: Path, params: Any) -> None:
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, *leaves)
    os.replace(tmp, path)


def _load_params(path: Path, template: Any) -> Any:
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as z:
        stored = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(stored) != len(leaves) or any(a.shape != b.shape for a, b in zip(stored, leaves)):
        raise ResultsError(f"{path} does not hold parameters of this model; delete it and the "
                           ".jsonl beside it to start the run again")
    return jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=b.dtype) for a, b in zip(stored, leaves)])


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def _comparable(cfg: dict) -> dict:
    # keys added to ALConfig later are missing from older files: they ran with the default
    full = {**ALConfig().to_dict(), **cfg}
    return {k: v for k, v in full.items() if k not in NOT_COMPARED}


def read_results(path: str | os.PathLike, config: ALConfig | None = None, *,
                 repair: bool = False) -> list[dict]:
    """The complete cycle records of a results file, checked.

    A last line without its newline (a run killed while writing) is dropped, and with
    ``repair=True`` cut from the file.  Raises :class:`ResultsError` for a corrupt line, cycles out
    of order, or (when ``config`` is given) records written with another configuration.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, offset = [], 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and line.strip():
            # no trailing newline: an interrupted write
            if repair:
                with open(path, "r+b") as fh:
                    fh.truncate(offset)
            break
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "cycle" not in rec or "config" not in rec:
                raise ValueError("not a cycle record")
        except ValueError as err:
            raise ResultsError(
                f"{path}, line {i + 1}, is corrupt ({err}): {line[:80]!r}. The file cannot be "
                f"resumed; delete it (and {path.stem}.cycle*.npz beside it) to rerun from scratch, "
                "or remove that line and every later one to resume before it") from None
        if rec["cycle"] != len(records):
            raise ResultsError(f"{path}, line {i + 1}: cycle {rec['cycle']} where cycle {len(records)} "
                               "was expected; the file was edited or written twice. Delete it to rerun")
        if config is not None and _comparable(rec["config"]) != _comparable(config.to_dict()):
            old, new = _comparable(rec["config"]), _comparable(config.to_dict())
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            details = ", ".join(f"{k}: file {old.get(k)!r} vs now {new.get(k)!r}" for k in diff)
            raise ResultsError(
                f"{path} was written with another configuration ({details}). Use another --out "
                "folder, rerun with the file's settings, or delete the file to start again")
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# one experiment
# ---------------------------------------------------------------------------------------------


def _train(apply_fn, params, x, y, config: ALConfig, key):
    """Train; returns ``(apply_fn, params)`` (``apply_fn`` changes for batch-norm models: it
    carries the new running statistics)."""
    from ..train import train

    stochastic = config.batch_size is not None or config.dropout > 0
    bs = None if config.batch_size is None else min(int(config.batch_size), len(x))
    res = train(apply_fn, params, x, y, lr=config.lr, epochs=config.epochs, loss=config.loss,
                batch_size=bs, momentum=config.momentum, weight_decay=config.weight_decay,
                dropout=config.dropout > 0, key=key if stochastic else None,
                recompute_stats=config.bn_stats == "recompute")
    return res.apply_fn, res.params


def _sequential_query(apply_fn, params, config, ds, labelled, cand, key, timings: dict | None = None):
    """Add ``config.query`` labels one (``step``) at a time through the proxy, as the released
    code's ``sequential_selection``: each pick is the top score on the current proxy, gets its
    true label, and the proxy's posterior over the candidates is conditioned on it
    (:func:`lookahead.condition`, no SGD); picked points stay in the set the change is summed
    over but are not picked again.  With ``retrain_every`` the network is retrained by SGD every
    that many labels and the kernel recomputed; by default SGD runs once per cycle.
    Returns ``(queried train indices, apply_fn, params)``."""
    k = ds.num_classes
    kern = _s.KERNELS[config.kernel]
    eye = np.eye(k)
    objective = _s.LOOKAHEAD[config.strategy]
    queried: list[int] = []
    n_retrain = 0
    while len(queried) < config.query:
        lab = np.asarray(list(labelled) + queried)
        pool = np.asarray([i for i in cand if i not in set(queried)])
        m = len(pool)
        size = m * (k if config.kernel == "entk" else 1)
        need, have = 3 * 8 * size**2, _kernels.available_memory()
        if need > 0.8 * have:
            raise ValueError(f"sequential querying keeps the posterior covariance of the {m} candidates "
                             f"({need / 2**30:.1f} GiB with kernel {config.kernel!r}) but {have / 2**30:.1f} GiB "
                             "is available: use --kernel pntk or a smaller --subset")
        x_all = jnp.asarray(np.concatenate([ds.x_train[lab], ds.x_train[pool]]))
        start = time.perf_counter()
        k_all = np.asarray(kern(apply_fn, params, x_all), np.float64)
        if timings is not None:
            timings["kernel_s"] = timings.get("kernel_s", 0.0) + time.perf_counter() - start
        f_all = _s._logits(apply_fn, params, x_all)
        n = len(lab)
        proxy = lookahead.fit_proxy(k_all[:n, :n], eye[ds.y_train[lab]], f_all[:n], ridge=config.ridge)
        post = lookahead.pool_posterior(proxy, k_all[n:, :n], k_all[n:, n:], f_all[n:])
        del k_all
        block = config.query - len(queried)
        if config.retrain_every:
            block = min(block, config.retrain_every - len(queried) % config.retrain_every)
        picked: list[int] = []
        while len(picked) < block:
            s = min(config.step, block - len(picked))
            scores = _s.posterior_scores(post, objective, network=f_all[n:], relative_to=config.relative_to,
                                         probabilities_how=config.probabilities)
            scores[picked] = -np.inf  # picked points stay in the sum, but are not picked again
            pick = _s.top_b(scores, s, jax.random.fold_in(key, len(queried) + len(picked)))
            post = lookahead.condition(post, pick, eye[ds.y_train[pool[pick]]])  # true labels
            picked += [int(i) for i in pick]
        queried += [int(pool[i]) for i in picked]
        if len(queried) < config.query:  # SGD retraining every retrain_every labels
            lab2 = np.asarray(list(labelled) + queried)
            apply_fn, params = _train(apply_fn, params, ds.x_train[lab2], ds.y_train[lab2], config,
                                      jax.random.fold_in(key, 10_000 + n_retrain))
            n_retrain += 1
    return np.asarray(queried, np.int64), apply_fn, params


def run_experiment(config: ALConfig | dict, out_dir: str | os.PathLike, *,
                   progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Run (or resume) one experiment; returns every cycle's record (old and new).

    ``progress(record)`` is called after each new cycle.
    """
    from ..plotting import versions

    if isinstance(config, dict):
        config = ALConfig.from_dict(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, config)
    records = read_results(path, config, repair=True)
    if len(records) >= config.cycles:
        return records

    ds = load_data(config)
    n_pool = len(ds.x_train)
    if config.init > n_pool:
        raise ValueError(f"init ({config.init}) exceeds the {n_pool} training points")
    apply_fn, params = build_model(config, int(np.prod(ds.x_train.shape[1:])), ds.num_classes,
                                   getattr(ds, "image_shape", None))
    base_key = jax.random.key(config.seed)
    if records:
        last = records[-1]
        labelled = [int(i) for i in last["labelled"]] + [int(i) for i in last["queried"]]
        ppath = _params_path(path, last["cycle"])
        if not ppath.exists():
            raise ResultsError(f"{ppath} (the warm-start parameters of cycle {last['cycle']}) is missing; "
                               f"delete {path} to rerun from scratch")
        params, stats = _load_params(ppath, _state(apply_fn, params))
        if stats:
            apply_fn = apply_fn.with_batch_stats(stats)
    else:
        rng = np.random.default_rng([config.seed, 0xA1])
        labelled = [int(i) for i in rng.choice(n_pool, config.init, replace=False)]
    vers = versions()
    for cycle in range(len(records), config.cycles):
        t0 = time.perf_counter()
        ckey = jax.random.fold_in(base_key, cycle)
        lab = np.asarray(labelled, np.int64)
        apply_fn, params = _train(apply_fn, params, ds.x_train[lab], ds.y_train[lab], config,
                                  jax.random.fold_in(ckey, 0))
        jax.block_until_ready(params)
        t1 = time.perf_counter()
        from ..train import accuracy

        acc = accuracy(apply_fn, params, ds.x_test, ds.y_test)
        t2 = time.perf_counter()
        unl = np.setdiff1d(np.arange(n_pool), lab)
        rng = np.random.default_rng([config.seed, cycle, 0x5B])
        cand = np.sort(rng.choice(unl, min(config.subset, len(unl)), replace=False))
        budget = min(config.query, len(cand))
        if config.mode == "batch":
            ctx = _s.Context(apply_fn, params, ds.x_train[lab], ds.y_train[lab], ds.x_train[cand],
                             ds.num_classes, kernel=config.kernel, ridge=config.ridge,
                             mc_samples=config.mc_samples, relative_to=config.relative_to,
                             proxy=config.proxy, probabilities=config.probabilities, lr=config.lr)
            queried = cand[_s.select(config.strategy, ctx, budget, jax.random.fold_in(ckey, 1))]
            kernel_s = ctx.timings.get("kernel_s", 0.0)
        else:
            step_cfg = replace(config, step=1) if config.mode == "sequential" else config
            timings: dict = {}
            queried, apply_fn, params = _sequential_query(apply_fn, params, step_cfg, ds, lab, cand,
                                                          jax.random.fold_in(ckey, 1), timings)
            kernel_s = timings.get("kernel_s", 0.0)
        t3 = time.perf_counter()
        rec = {
            "cycle": cycle,
            "strategy": config.strategy,
            "seed": config.seed,
            "n_labelled": int(len(lab)),
            "accuracy": float(acc),
            "labelled": [int(i) for i in lab],
            "queried": [int(i) for i in queried],
            "timings": {"train_s": t1 - t0, "evaluate_s": t2 - t1, "query_s": t3 - t2, "kernel_s": kernel_s,
                        "total_s": t3 - t0},
            "config": config.to_dict(),
            "versions": vers,
        }
        # parameters first, then the line: a line on disk always has its parameters
        # (in sequential mode with retraining, the warm start is the last retrained network)
        _save_params(_params_path(path, cycle), _state(apply_fn, params))
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        records.append(rec)
        labelled = labelled + [int(i) for i in queried]
        if progress is not None:
            progress(rec)
    return records


def parse_seeds(text: str) -> list[int]:
    """``"0-2"`` -> ``[0, 1, 2]``; ``"0,3,5"``; ``"4"``."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out:
        raise ValueError(f"no seeds in {text!r}")
    return out


def _run_one(config_dict: dict, out_dir: str) -> int:  # for worker processes
    return len(run_experiment(ALConfig.from_dict(config_dict), out_dir))
