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
seed, labelled indices, queried indices, accuracy, timings, package versions, git commit) and saves the
trained parameters of the cycle beside it (``<strategy>_seed<k>.cycleNNN.npz``).  Running again
resumes after the last complete cycle: the labelled set and the warm-start parameters are
restored, every random choice is derived from ``(seed, cycle)``, so an interrupted run continues
exactly as an uninterrupted one would have.  A results file is locked while a run writes it
(:class:`RunLock`: a second run on it is refused, naming the process).  Lines that cannot be
resumed (corrupt, repeated, out of order) are moved to ``<file>.rejected`` with a
:class:`ResultsWarning` and every valid cycle is kept; a different configuration raises
:class:`ResultsError` saying what to do.  Every configuration field is checked by type and range
(:class:`FieldSpec`, :class:`ConfigError`), and a look-ahead run that would not fit in memory is
refused before anything is trained.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import lookahead
from . import strategies as _s

MODES = ("batch", "sequential", "hybrid")
# batch-norm running statistics after each cycle's training: recomputed on the labelled set
# with the final parameters, or the exponential moving averages of training
BN_STATS = ("recompute", "running")
# configuration fields that may differ between runs appending to the same file
NOT_COMPARED = ("cycles",)


class ResultsError(RuntimeError):
    """A results file that cannot be resumed (corrupt, written with another configuration, or
    being written by another run)."""


class ResultsWarning(UserWarning):
    """Lines of a results file set aside (corrupt, duplicated or out of order); they are kept in
    ``<file>.rejected``, never deleted."""


class ConfigError(ValueError):
    """A configuration field of the wrong type or out of range (``field``: its name, or ``None``
    for a rule across fields; ``reason``: what was wrong and what is expected)."""

    def __init__(self, field: str | None, reason: str, text: str | None = None):
        self.field, self.reason, self.text = field, reason, text
        super().__init__(text or (reason if field is None else f"{field} {reason}"))

    def __reduce__(self):  # picklable: errors of worker processes (al --jobs N) reach the parent
        return (type(self), (self.field, self.reason, self.text))


# ---------------------------------------------------------------------------------------------
# configuration fields: one declaration per field (type, range, allowed values) in its metadata;
# ALConfig, --config files and the command line's options all go through FieldSpec.validate
# ---------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    kind = {str: "a string", bool: "a boolean", float: "a number", int: "an integer", list: "a list",
            tuple: "a tuple", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


@dataclass(frozen=True)
class FieldSpec:
    """What one :class:`ALConfig` field accepts.

    ``kind``: ``"int"``, ``"float"``, ``"choice"`` or ``"widths"`` (a non-empty list of positive
    integers); ``lo``/``hi`` bounds (``lo_open``/``hi_open``: strict); ``choices``: the allowed
    strings, or a function returning them (late: registries of other modules); ``optional``:
    ``None`` is allowed; ``rule``: ``(test, what it means)`` for a further constraint."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Any = None
    optional: bool = False
    rule: tuple | None = None

    def allowed(self) -> list[str]:
        return list(self.choices() if callable(self.choices) else self.choices)

    def expected(self) -> str:
        """What the field accepts, in words (for messages and --help)."""
        if self.kind == "choice":
            text = "one of " + ", ".join(self.allowed())
        elif self.kind == "widths":
            text = "a list of positive integers such as [256, 256]"
        else:
            text = "an integer" if self.kind == "int" else "a finite number"
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:{'d' if self.kind == 'int' else 'g'}}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {self.hi:{'d' if self.kind == 'int' else 'g'}}")
            if bounds:
                text += " " + " and ".join(bounds)
            if self.rule is not None:
                text += f" ({self.rule[1]})"
        return text + (" or null (the default)" if self.optional else "")

    def validate(self, name: str, value: Any) -> Any:
        """``value`` in its canonical type (int, float, str, tuple of ints), or :class:`ConfigError`."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(name, f"must be {self.expected()}, got null")
        if self.kind == "choice":
            allowed = self.allowed()
            if not isinstance(value, str) or value not in allowed:
                import difflib

                close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                if not isinstance(value, str):
                    raise ConfigError(name, f"must be {self.expected()}, got {_describe(value)}")
                raise ConfigError(name, f"has no value {value!r}{hint}; choose {self.expected()}",
                                  f"unknown {name} {value!r}{hint}; choose {self.expected()}")
            return value
        if self.kind == "widths":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or any(
                    isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in value):
                extra = (" (a string: write a list, e.g. [256] in a --config file, --hidden 256,256 on the "
                         "command line)") if isinstance(value, str) else ""
                raise ConfigError(name, f"must be {self.expected()}, got {value!r}{extra}")
            return tuple(int(v) for v in value)
        if self.kind == "int":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ConfigError(name, f"must be {self.expected()}, got {_describe(value)}")
            value = int(value)
        else:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ConfigError(name, f"must be {self.expected()}, got {_describe(value)}")
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(name, f"must be {self.expected()}, got {value}")
        low_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low_bad or high_bad or (self.rule is not None and not self.rule[0](value)):
            raise ConfigError(name, f"must be {self.expected()}, got {value}")
        return value

    def parse(self, name: str, text: str) -> Any:
        """A command-line string as the field's value (then :meth:`validate`)."""
        if self.optional and text.strip().lower() in ("none", "null", "default"):
            return None
        if self.kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise ConfigError(name, f"must be {self.expected()}, got {text!r}") from None
        elif self.kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(name, f"must be {self.expected()}, got {text!r}") from None
        elif self.kind == "widths":
            try:
                value = tuple(int(part) for part in text.split(","))
            except ValueError:
                raise ConfigError(name, f"must be comma-separated positive integers such as 256,256, "
                                        f"got {text!r}") from None
        else:
            value = text
        return self.validate(name, value)


def _spec(default: Any, kind: str, **options) -> Any:
    return field(default=default, metadata={"spec": FieldSpec(kind, **options)})


def _datasets() -> list[str]:
    from .. import data

    return data.available()


_NORMALIZE = ("standardize", "unit-norm", "none")
_SEED_MAX = 2**31 - 1  # jax.random.key and numpy's generators take it on every platform


@dataclass(frozen=True)
class ALConfig:
    """One active-learning experiment (a strategy and a seed); see the module docstring.

    ``data_seed`` fixes the train/test split (the same for every seed); ``seed`` draws the
    initial labelled set, the initial network, the candidate subsets and SGD's shuffling.
    Every field is checked by type and range when the configuration is made
    (:class:`FieldSpec` in each field's metadata; :class:`ConfigError` says which field, what it
    got and what it accepts).
    """

    dataset: str = _spec("digits", "choice", choices=_datasets)
    strategy: str = _spec("random", "choice", choices=lambda: list(_s.STRATEGIES))
    seed: int = _spec(0, "int", lo=0, hi=_SEED_MAX)
    init: int = _spec(20, "int", lo=1)
    query: int = _spec(10, "int", lo=1)
    subset: int = _spec(300, "int", lo=1)
    cycles: int = _spec(5, "int", lo=1)
    model: str = _spec("mlp", "choice", choices=lambda: MODELS)
    hidden: tuple = _spec((256,), "widths")
    stages: int = _spec(1, "int", lo=1, hi=3)  # wrn: stages of the released Wide_ResNet (its num_layers)
    depth: int = _spec(10, "int", lo=10, rule=(lambda v: (v - 4) % 6 == 0, "6n + 4: 10, 16, 22, ..."))  # wrn
    widen: int = _spec(20, "int", lo=1)  # wrn: widening factor k (channels 16k, then 32k, 64k, 128k per stage)
    width: int = _spec(64, "int", lo=1)  # ResNet18: channels of the first stage
    dropout: float = _spec(0.0, "float", lo=0.0, hi=1.0, hi_open=True)
    loss: str = _spec("mse", "choice", choices=("mse", "xent"))
    lr: float = _spec(0.5, "float", lo=0.0, lo_open=True)
    # over each cycle's training: "onecycle" (lr is the peak) or "cosine"
    lr_schedule: str = _spec("constant", "choice", choices=("constant", "onecycle", "cosine"))
    epochs: int = _spec(100, "int", lo=1)
    batch_size: int | None = _spec(None, "int", lo=1, optional=True)
    momentum: float = _spec(0.0, "float", lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = _spec(0.0, "float", lo=0.0)
    kernel: str = _spec("pntk", "choice", choices=lambda: list(_s.KERNELS))
    ridge: float = _spec(0.0, "float", lo=0.0)
    mc_samples: int = _spec(20, "int", lo=1)
    # None: "network" in batch mode, "proxy" otherwise (as released)
    relative_to: str | None = _spec(None, "choice", choices=lambda: _s.REFERENCES, optional=True)
    proxy: str = _spec("linearised", "choice", choices=lambda: _s.PROXIES)
    # None: "simplex" for EMOC under the square loss, else softmax
    probabilities: str | None = _spec(None, "choice", choices=lambda: _s.PROBABILITIES, optional=True)
    bn_stats: str = _spec("recompute", "choice", choices=lambda: BN_STATS)
    mode: str = _spec("batch", "choice", choices=lambda: MODES)
    step: int = _spec(1, "int", lo=1)
    retrain_every: int = _spec(0, "int", lo=0)
    data_seed: int = _spec(0, "int", lo=0, hi=_SEED_MAX)
    n_train: int | None = _spec(None, "int", lo=1, optional=True)
    n_test: int | None = _spec(None, "int", lo=1, optional=True)
    # data.load's normalize= (None: the loader's default)
    normalize: str | None = _spec(None, "choice", choices=_NORMALIZE, optional=True)

    def __post_init__(self):
        for f in fields(self):  # type and range of every field, from its declaration
            spec = f.metadata.get("spec")  # every field declares one (tests/test_faults.py checks)
            if spec is not None:
                object.__setattr__(self, f.name, spec.validate(f.name, getattr(self, f.name)))
        if self.relative_to is None:
            object.__setattr__(self, "relative_to", "network" if self.mode == "batch" else "proxy")
        if self.probabilities is None:
            object.__setattr__(self, "probabilities",
                               "simplex" if self.strategy == "emoc" and self.loss == "mse" else "softmax")
        if self.proxy != "linearised" and self.strategy not in _s.LOOKAHEAD:
            raise ConfigError(None, f"proxy={self.proxy!r} is an approximation of retraining for the look-ahead "
                                    f"strategies ({', '.join(_s.LOOKAHEAD)}), not for {self.strategy!r}")
        if self.proxy != "linearised" and self.mode != "batch":
            raise ConfigError(None, f"proxy={self.proxy!r} runs in batch mode only; sequential querying "
                                    "conditions the linearised network's posterior")
        if self.mode != "batch" and self.strategy not in _s.LOOKAHEAD:
            raise ConfigError(None,
                              f"mode={self.mode!r} adds labels through the retraining proxy: it needs a "
                              f"look-ahead strategy ({', '.join(_s.LOOKAHEAD)}), not {self.strategy!r}; "
                              "use mode='batch' for the others")
        if self.strategy == "bald" and not self.dropout > 0:
            raise ConfigError(None, "strategy 'bald' samples dropout masks (MC dropout): set dropout > 0, "
                                    "e.g. --dropout 0.2 (the network is then trained with dropout too)")
        if self.query > self.subset:
            raise ConfigError(None, f"query ({self.query}) must not exceed subset ({self.subset})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ALConfig":
        if not isinstance(d, dict):
            raise ConfigError(None, f"a configuration is a JSON object of fields such as "
                                    f'{{"epochs": 100}}, got {type(d).__name__}')
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            import difflib

            close = {u: difflib.get_close_matches(str(u), sorted(known), n=1) for u in unknown}
            hints = "; ".join(f"{u!r}: did you mean {c[0]!r}?" for u, c in close.items() if c)
            raise ConfigError(None, f"unknown configuration keys {sorted(map(str, unknown))}"
                                    + (f" ({hints})" if hints else "") + f"; known: {sorted(known)}")
        return cls(**d)


def field_spec(name: str) -> FieldSpec | None:
    """The :class:`FieldSpec` of configuration field ``name`` (``None`` if it declares none)."""
    for f in fields(ALConfig):
        if f.name == name:
            return f.metadata.get("spec")
    raise KeyError(name)


# Paper protocols (Mohamadi, Bae & Sutherland 2022, Sec. 5), a CPU stand-in of the MNIST one with
# the paper's model family, and two fast demos.  PROVENANCE says where each setting comes from.
_RELEASED_SGD = dict(lr=0.3, momentum=0.9, weight_decay=1e-4, batch_size=128, epochs=200)


def _released_sgd(classes: int) -> dict:
    """The released SGD settings in this package's units.  The released criterion is PyTorch's
    ``MSELoss()``: the mean over the batch *and the k outputs* of ``(f - y)^2``, whose gradient
    is ``2 / k`` times that of this package's ``(1/2) ||f - y||^2`` averaged over the batch.
    With weight decay coupled to the gradient (both add ``wd w``), ``lr * 2 / k`` and
    ``wd * k / 2`` give the released steps exactly, momentum included."""
    return {**_RELEASED_SGD, "lr": _RELEASED_SGD["lr"] * 2 / classes,
            "weight_decay": _RELEASED_SGD["weight_decay"] * classes / 2}


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
                  depth=10, widen=20, normalize="none", **_released_sgd(10)),
    "svhn": dict(dataset="svhn", init=1000, query=1000, subset=6000, cycles=10, model="wrn", stages=1,
                 depth=10, widen=20, **_released_sgd(10)),
    "cifar10": dict(dataset="cifar10", init=1000, query=1000, subset=6000, cycles=10, model="wrn",
                    stages=2, depth=10, widen=10, **_released_sgd(10)),
    "cifar100": dict(dataset="cifar100", init=10000, query=1000, subset=6000, cycles=10,
                     model="resnet18", **_released_sgd(100)),
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
    "loss": ("released", "square loss on one-hot labels (criterion l2); here (1/2)||f - y||^2 per "
                         "example, the released MSELoss averages over the k outputs too, so lr and "
                         "weight_decay are translated (gradient 2/k of ours)"),
    "lr": ("released", "0.3 (example config) in the released loss's units: 0.3 x 2/k here (0.06 for "
                       "k = 10, 0.006 for CIFAR-100); the released schedule is one-cycle"),
    "lr_schedule": ("ours", "constant: the released example config names a one-cycle schedule (peak "
                            "1.25 in its units, 0.25 here), built once per run; on the one-stage WRN "
                            "(k = 1) with 100 labels a per-cycle one-cycle schedule at peak 1.25 here "
                            "(5x the released) was unstable (test accuracy 0.52-0.76 across 196-200 "
                            "epochs, constant: 0.76-0.77), at 280 labels better (0.91-0.92 vs "
                            "0.85-0.91); --lr-schedule onecycle --lr 0.25 runs the released peak"),
    "momentum": ("released", "0.9"),
    "weight_decay": ("released", "1e-4 in the released loss's units: 1e-4 x k/2 here (5e-4 for k = 10, "
                                 "5e-3 for CIFAR-100), so that lr x weight_decay is the released one"),
    "batch_size": ("released", "128"),
    "epochs": ("released", "200 per cycle (the released default), warm-started across cycles"),
    "kernel": ("released", "pNTK: sum of logits / sqrt(k) (apply_fn_trace, trace_axes [-1])"),
    "ridge": ("ours", "0 plus the smallest jitter that lets Cholesky succeed; the released code adds "
                      "1e-5 x mean diagonal from cycle 5 (+1e-5 per cycle), not implemented"),
    "relative_to": ("released", "batch: flips counted against the network's arg-max; sequential: "
                                "against the current proxy"),
    "probabilities": ("released", "simplex projection of square-loss outputs for EMOC"),
    "bn_stats": ("ours", "running statistics recomputed on the labelled set after training, in "
                         "batches of batch_size averaged with equal weights (the released "
                         "adjust_batchnorm_stats, default on in its code, off in its example config, "
                         "averages three passes of full batches over the whole training set, labelled "
                         "or not): with 100-300 labels the moving averages lag and the network in "
                         "evaluation mode fits L badly"),
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
        "lr": ("ours", "0.3 in this package's units: 5x the released step (the released MSELoss "
                       "averages over the 10 outputs: 0.06 here is the released 0.3); the committed "
                       "six seeds ran with it; --lr 0.06 --weight-decay 5e-4 gives the released steps"),
        "weight_decay": ("ours", "1e-4 in this package's units (the released step is 5e-4 with lr 0.06)"),
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
        "lr_schedule": ("ours", "constant full-batch steps"),
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
            import difflib

            close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
            raise ConfigError(None, f"unknown preset {preset!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f"; choose one of {', '.join(PRESETS)}")
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
    """``(apply_fn, params, state)`` of the configured model, initialised from ``config.seed``
    (``state``: the batch-norm running statistics, ``None`` without batch norm).

    Image models need ``image_shape`` ``(H, W, C)`` (the data set's ``image_shape``)."""
    from flax import nnx

    from .. import models

    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    rngs = nnx.Rngs(params=key)
    if config.model == "mlp":
        return models.split(models.MLP((in_dim, *config.hidden, num_classes), dropout=config.dropout,
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
    return models.split(model)


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


def _saved(params, state) -> tuple:
    """What a cycle saves: the parameters and the batch-norm statistics (``{}`` without)."""
    return (params, {} if state is None else state)


def _save_params(path: Path, params: Any) -> None:
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, *leaves)
    os.replace(tmp, path)


class ParamsUnreadable(ResultsError):
    """A cycle's parameter file is missing or not a NumPy ``.npz`` (a run killed while writing
    it, or a file replaced by something else)."""


def _load_params(path: Path, template: Any) -> Any:
    leaves, treedef = jax.tree.flatten(template)
    if not path.exists():
        raise ParamsUnreadable(f"{path} is missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = [z[f"arr_{i}"] for i in range(len(z.files))]
    except Exception as err:  # noqa: BLE001 - zipfile, pickle and OS errors all mean "unreadable"
        raise ParamsUnreadable(f"{path} is not a parameter file written by this runner "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None
    if len(stored) != len(leaves) or any(a.shape != b.shape for a, b in zip(stored, leaves)):
        raise ResultsError(f"{path} does not hold parameters of this model (another model or an older "
                           "version of it); move the results folder aside, or use another --out folder")
    return jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=b.dtype) for a, b in zip(stored, leaves)])


# ---------------------------------------------------------------------------------------------
# one run per results file: a lock
# ---------------------------------------------------------------------------------------------


def lock_path(results: str | os.PathLike) -> Path:
    """The lock beside a results file: ``<file>.lock`` (it names the process holding it)."""
    results = Path(results)
    return results.with_name(results.name + ".lock")


class RunLock:
    """An exclusive lock on one results file, held while a run writes it.

    ``flock`` on ``<file>.lock``: the operating system releases it when the process ends,
    however it ends (SIGKILL included), so a lock is never stale; the file holds the process id,
    host and start time for the message another run gets.  A second run on the same results
    file raises :class:`ResultsError` naming the process that holds it, instead of writing every
    cycle twice.
    """

    def __init__(self, results: str | os.PathLike):
        self.results = Path(results)
        self.path = lock_path(self.results)
        self._fh = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def acquire(self) -> "RunLock":
        import fcntl
        import socket

        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                raise ResultsError(
                    f"{self.results} is being written by another run ({holder or 'a process'}, lock "
                    f"{self.path}); wait for it to finish or stop it, or use another --out folder: two "
                    "runs on one results file would write every cycle twice") from None
            try:  # the lock file may have been removed by the previous holder meanwhile: retry
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        import fcntl

        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def _comparable(cfg: dict) -> dict:
    # keys added to ALConfig later are missing from older files: they ran with the default
    full = {**ALConfig().to_dict(), **cfg}
    return {k: v for k, v in full.items() if k not in NOT_COMPARED}


def rejected_path(results: str | os.PathLike) -> Path:
    """Where lines set aside from a results file go: ``<file>.rejected`` (appended, never read)."""
    results = Path(results)
    return results.with_name(results.name + ".rejected")


def _config_difference(old: dict, new: dict) -> str:
    old, new = _comparable(old), _comparable(new)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: file {old.get(k)!r} vs now {new.get(k)!r}" for k in diff)


def _scan(path: Path, raw: bytes, config: ALConfig | None):
    """Split a results file into ``(kept records, their raw lines, set-aside lines with reasons)``.

    A record is kept when it is the next cycle, was written with the file's configuration and
    continues the previous one (its labelled set is the previous labelled set plus the previous
    queries).  A repeat of a kept cycle with the same labels (a second run that wrote the same
    cycle again) is set aside as a duplicate; corrupt lines, gaps and conflicting records are set
    aside too, and later lines that continue the chain are still kept."""
    kept, kept_lines, aside = [], [], []
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            continue
        if last:  # no trailing newline: an interrupted write
            aside.append((i + 1, line, "incomplete last line (a run stopped while writing it)"))
            break
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "cycle" not in rec or "config" not in rec:
                raise ValueError("not a cycle record")
            cycle = int(rec["cycle"])
            labelled, queried = list(rec["labelled"]), list(rec["queried"])
        except (ValueError, TypeError, KeyError) as err:
            aside.append((i + 1, line, f"corrupt ({err})"))
            continue
        if cycle < len(kept) and cycle >= 0:
            same = kept[cycle]["labelled"] == labelled and kept[cycle]["queried"] == queried
            aside.append((i + 1, line, f"a second copy of cycle {cycle}" + ("" if same else " with other labels")))
            continue
        if cycle != len(kept):
            aside.append((i + 1, line, f"cycle {cycle} where cycle {len(kept)} was expected"))
            continue
        if kept:
            prev = kept[-1]
            if _comparable(rec["config"]) != _comparable(prev["config"]):
                aside.append((i + 1, line, "written with another configuration "
                                           f"({_config_difference(prev['config'], rec['config'])})"))
                continue
            if labelled != list(prev["labelled"]) + list(prev["queried"]):
                aside.append((i + 1, line, f"cycle {cycle} does not continue cycle {cycle - 1} (other labels)"))
                continue
        elif config is not None and _comparable(rec["config"]) != _comparable(config.to_dict()):
            raise ResultsError(
                f"{path} was written with another configuration ({_config_difference(rec['config'], config.to_dict())}). "
                "Use another --out folder, rerun with the file's settings, or move the file aside to start again")
        kept.append(rec)
        kept_lines.append(line)
    return kept, kept_lines, aside


def _set_aside(path: Path, kept_lines: list[bytes], aside: list[tuple[int, bytes, str]]) -> Path:
    """Append the set-aside lines to ``<file>.rejected`` and rewrite the file with the kept ones
    (atomically: a temporary file renamed over it)."""
    rej = rejected_path(path)
    with open(rej, "ab") as fh:
        for _, line, _ in aside:
            fh.write(line + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(b"".join(line + b"\n" for line in kept_lines))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return rej


def read_results(path: str | os.PathLike, config: ALConfig | None = None, *,
                 repair: bool = False) -> list[dict]:
    """The valid cycle records of a results file, in order.

    Every valid cycle is kept (see :func:`_scan`): a last line without its newline (a run killed
    while writing), corrupt lines, repeated cycles (two runs on one file) and records that do not
    continue the chain are set aside with a :class:`ResultsWarning` naming them.  With
    ``repair=True`` they are moved to ``<file>.rejected`` (never deleted) and the file keeps the
    valid cycles, so a run resumes after the last of them.  Raises :class:`ResultsError` when
    ``config`` is given and the file was written with another configuration.
    """
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise ResultsError(f"{path} is a folder, not a results file")
    raw = path.read_bytes()
    kept, kept_lines, aside = _scan(path, raw, config)
    real = [a for a in aside if not a[2].startswith("incomplete last line")]
    if aside and repair:
        rej = _set_aside(path, kept_lines, aside)
        if real:
            warnings.warn(ResultsWarning(
                f"{path}: {len(real)} line(s) set aside into {rej} ("
                + "; ".join(f"line {n}: {why}" for n, _, why in real[:3]) + ("; ..." if len(real) > 3 else "")
                + f"); the {len(kept)} valid cycle(s) are kept"), stacklevel=2)
    elif real:
        warnings.warn(ResultsWarning(
            f"{path}: {len(real)} line(s) skipped ("
            + "; ".join(f"line {n}: {why}" for n, _, why in real[:3]) + ("; ..." if len(real) > 3 else "")
            + f"); using its {len(kept)} valid cycle(s); resuming the run moves them to {rejected_path(path).name}"),
            stacklevel=2)
    return kept


def _usable_records(path: Path, records: list[dict], template: Any) -> tuple[list[dict], Any]:
    """The records whose run can be continued, and the warm-start state of the last of them.

    A cycle's warm start is its saved parameters.  When those of the last cycle are missing or
    unreadable, the last cycles are set aside into ``<file>.rejected`` back to one whose
    parameters load (the run is deterministic: they are recomputed identically)."""
    keep = len(records)
    while keep:
        try:
            state = _load_params(_params_path(path, records[keep - 1]["cycle"]), template)
        except ParamsUnreadable as err:
            problem = str(err)
            keep -= 1
            continue
        if keep < len(records):
            lines = path.read_bytes().split(b"\n")
            body = [line for line in lines if line.strip()]
            _set_aside(path, body[:keep], [(0, line, "") for line in body[keep:]])
            warnings.warn(ResultsWarning(
                f"{path}: {problem}; cycles {keep}..{len(records) - 1} moved to {rejected_path(path).name} "
                f"and recomputed from the parameters of cycle {keep - 1}"), stacklevel=2)
        return records[:keep], state
    if records:
        body = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        _set_aside(path, [], [(0, line, "") for line in body])
        warnings.warn(ResultsWarning(
            f"{path}: no cycle's parameters can be read ({problem}); its {len(records)} cycle(s) moved to "
            f"{rejected_path(path).name} and the run restarts from cycle 0"), stacklevel=2)
    return [], None


# ---------------------------------------------------------------------------------------------
# one experiment
# ---------------------------------------------------------------------------------------------


def _train(apply_fn, params, state, x, y, config: ALConfig, key):
    """Train; returns ``(params, state)`` (the state: the new batch-norm running statistics)."""
    from ..train import train

    stochastic = config.batch_size is not None or config.dropout > 0
    bs = None if config.batch_size is None else min(int(config.batch_size), len(x))
    res = train(apply_fn, params, x, y, lr=config.lr, epochs=config.epochs, loss=config.loss,
                batch_size=bs, momentum=config.momentum, weight_decay=config.weight_decay,
                dropout=config.dropout > 0, key=key if stochastic else None,
                recompute_stats=config.bn_stats == "recompute", lr_schedule=config.lr_schedule, state=state)
    return res.params, res.state


def _sequential_query(apply_fn, params, state, config, ds, labelled, cand, key, timings: dict | None = None):
    """Add ``config.query`` labels one (``step``) at a time through the proxy, as the released
    code's ``sequential_selection``: each pick is the top score on the current proxy, gets its
    true label, and the proxy's posterior over the candidates is conditioned on it
    (:func:`lookahead.condition`, no SGD); picked points stay in the set the change is summed
    over but are not picked again.  With ``retrain_every`` the network is retrained by SGD every
    that many labels and the kernel recomputed; by default SGD runs once per cycle.
    Returns ``(queried train indices, params, state)``."""
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
        # the kernel, its float64 copy and the M x M pool posterior, checked before allocating
        _s.check_lookahead_memory(apply_fn, params, len(lab), m, ds.x_train.shape[1:], ds.x_train.dtype, k,
                                  kernel=config.kernel, sequential=True, state=state)
        # exact copies of labelled points (picked ones included) teach nothing: never picked
        known = _s.copies_of(ds.x_train[pool], ds.x_train[lab])
        x_all = jnp.asarray(np.concatenate([ds.x_train[lab], ds.x_train[pool]]))
        start = time.perf_counter()
        k_all = np.asarray(kern(apply_fn, params, x_all, state=state), np.float64)
        if timings is not None:
            timings["kernel_s"] = timings.get("kernel_s", 0.0) + time.perf_counter() - start
        f_all = _s._logits(apply_fn, params, x_all, state)
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
            scores[known] = -np.inf
            pick = _s.top_b(scores, s, jax.random.fold_in(key, len(queried) + len(picked)))
            post = lookahead.condition(post, pick, eye[ds.y_train[pool[pick]]])  # true labels
            picked += [int(i) for i in pick]
            known |= _s.copies_of(ds.x_train[pool], ds.x_train[pool[pick]])
        queried += [int(pool[i]) for i in picked]
        if len(queried) < config.query:  # SGD retraining every retrain_every labels
            lab2 = np.asarray(list(labelled) + queried)
            params, state = _train(apply_fn, params, state, ds.x_train[lab2], ds.y_train[lab2], config,
                                   jax.random.fold_in(key, 10_000 + n_retrain))
            n_retrain += 1
    return np.asarray(queried, np.int64), params, state


def check_experiment_memory(config: ALConfig, apply_fn, params, x_shape, x_dtype, num_classes: int,
                            n_pool: int, first_cycle: int = 0, state: Any = None) -> None:
    """Refuse, before anything is trained, a look-ahead experiment whose largest query round would
    not fit in memory (:func:`strategies.check_lookahead_memory`): the first remaining cycle (the
    most candidates) and the last (the most labels)."""
    if config.strategy not in _s.LOOKAHEAD:
        return
    for cycle in sorted({first_cycle, config.cycles - 1}):
        n = config.init + cycle * config.query
        m = min(config.subset, max(n_pool - n, 0))
        if m:
            _s.check_lookahead_memory(apply_fn, params, n, m, x_shape, x_dtype, num_classes, kernel=config.kernel,
                                      proxy=config.proxy, sequential=config.mode != "batch", state=state)


def run_experiment(config: ALConfig | dict, out_dir: str | os.PathLike, *,
                   progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Run (or resume) one experiment; returns every cycle's record (old and new).

    ``progress(record)`` is called after each new cycle.  The results file is locked while the
    run writes it (:class:`RunLock`: a second run on it raises :class:`ResultsError` naming the
    process); a look-ahead run that would not fit in memory is refused before any training
    (:class:`kernels.KernelTooLargeError`).
    """
    if isinstance(config, dict):
        config = ALConfig.from_dict(config)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as err:
        raise ResultsError(f"cannot write results to {out_dir}: {err.strerror or err}; choose another "
                           "results folder (--out)") from None
    path = results_path(out_dir, config)
    with RunLock(path):
        return _run_locked(config, path, progress)


def _run_locked(config: ALConfig, path: Path, progress) -> list[dict]:
    from ..provenance import record

    records = read_results(path, config, repair=True)
    if len(records) >= config.cycles:
        return records

    ds = load_data(config)
    n_pool = len(ds.x_train)
    if config.init > n_pool:
        raise ConfigError("init", f"({config.init}) exceeds the {n_pool} training points of {config.dataset!r}")
    apply_fn, params, state = build_model(config, int(np.prod(ds.x_train.shape[1:])), ds.num_classes,
                                          getattr(ds, "image_shape", None))
    check_experiment_memory(config, apply_fn, params, ds.x_train.shape[1:], ds.x_train.dtype, ds.num_classes,
                            n_pool, len(records), state=state)
    base_key = jax.random.key(config.seed)
    if records:
        records, saved = _usable_records(path, records, _saved(params, state))
    if records:
        last = records[-1]
        labelled = [int(i) for i in last["labelled"]] + [int(i) for i in last["queried"]]
        params, stats = saved
        state = stats if stats else None
    else:
        rng = np.random.default_rng([config.seed, 0xA1])
        labelled = [int(i) for i in rng.choice(n_pool, config.init, replace=False)]
    made_by = record()
    for cycle in range(len(records), config.cycles):
        t0 = time.perf_counter()
        ckey = jax.random.fold_in(base_key, cycle)
        lab = np.asarray(labelled, np.int64)
        params, state = _train(apply_fn, params, state, ds.x_train[lab], ds.y_train[lab], config,
                               jax.random.fold_in(ckey, 0))
        jax.block_until_ready(params)
        t1 = time.perf_counter()
        from ..train import accuracy

        acc = accuracy(apply_fn, params, ds.x_test, ds.y_test, state=state)
        t2 = time.perf_counter()
        unl = np.setdiff1d(np.arange(n_pool), lab)
        rng = np.random.default_rng([config.seed, cycle, 0x5B])
        cand = np.sort(rng.choice(unl, min(config.subset, len(unl)), replace=False))
        budget = min(config.query, len(cand))
        if config.mode == "batch":
            ctx = _s.Context(apply_fn, params, ds.x_train[lab], ds.y_train[lab], ds.x_train[cand],
                             ds.num_classes, kernel=config.kernel, ridge=config.ridge,
                             mc_samples=config.mc_samples, relative_to=config.relative_to,
                             proxy=config.proxy, probabilities=config.probabilities, lr=config.lr,
                             state=state)
            queried = cand[_s.select(config.strategy, ctx, budget, jax.random.fold_in(ckey, 1))]
            kernel_s = ctx.timings.get("kernel_s", 0.0)
        else:
            step_cfg = replace(config, step=1) if config.mode == "sequential" else config
            timings: dict = {}
            queried, params, state = _sequential_query(apply_fn, params, state, step_cfg, ds, lab, cand,
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
            **made_by,
        }
        # parameters first, then the line: a line on disk always has its parameters
        # (in sequential mode with retraining, the warm start is the last retrained network)
        _save_params(_params_path(path, cycle), _saved(params, state))
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        records.append(rec)
        labelled = labelled + [int(i) for i in queried]
        if progress is not None:
            progress(rec)
    return records


# More seeds than this in one command is a typo (0-99999999), not an experiment.
MAX_SEEDS = 10_000


def parse_seeds(text: str) -> list[int]:
    """``"0-2"`` -> ``[0, 1, 2]``; ``"0,3,5"``; ``"4"``.  Seeds are integers in
    ``[0, 2^31)``, at most :data:`MAX_SEEDS` of them; anything else raises ``ValueError``
    saying what was expected."""
    expected = "seeds such as 0-5 or 0,2,4 (integers >= 0)"
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            rng = re.fullmatch(r"(-?\s*\d+)\s*-\s*(-?\d+)", part)
            if rng:
                lo, hi = int(rng.group(1).replace(" ", "")), int(rng.group(2))
                if hi < lo:
                    raise ValueError(f"the range {part!r} is empty (write low-high, e.g. 0-5)")
                if lo < 0:
                    raise ValueError(f"seeds are integers >= 0, got {lo}")
                if hi - lo + 1 + len(out) > MAX_SEEDS:
                    raise ValueError(f"{part!r} names {hi - lo + 1} seeds; at most {MAX_SEEDS} per command")
                out.extend(range(lo, hi + 1))
            else:
                value = int(part)
                if value < 0:
                    raise ValueError(f"seeds are integers >= 0, got {value}")
                out.append(value)
        except ValueError as err:
            if "invalid literal" in str(err):
                raise ValueError(f"expected {expected}, got {text!r}") from None
            raise
        if out and max(out) > _SEED_MAX:
            raise ValueError(f"seeds must be below 2^31, got {max(out)}")
        if len(out) > MAX_SEEDS:
            raise ValueError(f"{len(out)} seeds; at most {MAX_SEEDS} per command")
    if not out:
        raise ValueError(f"no seeds in {text!r}; expected {expected}")
    return out


def _run_one(config_dict: dict, out_dir: str) -> int:  # for worker processes
    return len(run_experiment(ALConfig.from_dict(config_dict), out_dir))
