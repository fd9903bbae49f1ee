"""The active-learning experiments whose per-seed results ship in ``results/al/`` and that
notebook 04 reads, declared once: ``ntk-tutorial al-reproduce NAME`` reruns one (resumable).

Each experiment is a preset, a results folder and a list of runs ``(strategy, overrides)``;
every run uses the seeds of the experiment, and the seeds are run one after the other (all runs
of seed 0, then seed 1, ...) so that an interrupted experiment already has complete pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the released code's objective (flip count, relative to the network in batch mode)
RELEASED = "mlmoc-flips"


@dataclass(frozen=True)
class Experiment:
    preset: str
    folder: str
    runs: tuple
    seeds: str = "0-5"
    description: str = ""
    cycles: int | None = None
    extra: dict = field(default_factory=dict)


EXPERIMENTS: dict[str, Experiment] = {
    # the paper's MNIST protocol with the paper's model family (one-stage WRN, widen 1): hours
    "cpu-mnist-5k": Experiment(
        preset="cpu-mnist-5k", folder="results/al/cpu-mnist-5k",
        runs=(("random", {}), (RELEASED, {}), (RELEASED, {"mode": "sequential"})),
        description="MLMOC (released objective) batch and sequential vs random; one-stage WRN-10-1"),
    # the same with the released SGD steps: the released MSELoss averages over the 10 outputs, so
    # its lr 0.3 and weight decay 1e-4 are 0.06 and 5e-4 here (cpu-mnist-5k took 5x that step)
    "cpu-mnist-5k-released-step": Experiment(
        preset="cpu-mnist-5k", folder="results/al/cpu-mnist-5k-released-step",
        runs=(("random", {}), (RELEASED, {}), (RELEASED, {"mode": "sequential"}),
              (RELEASED, {"relative_to": "proxy"})),
        extra={"lr": 0.06, "weight_decay": 5e-4},
        description="cpu-mnist-5k with the released SGD steps (lr 0.06, weight decay 5e-4 in this "
                    "package's loss); batch, sequential, and the change measured from the proxy"),
    # the fast offline demo (MLP): every baseline, both references, both objectives, Fig. 1b
    "demo-mnist-5k": Experiment(
        preset="demo-mnist-5k", folder="results/al/demo-mnist-5k",
        runs=(("random", {}), (RELEASED, {}), ("mlmoc", {}), ("emoc", {}), ("entropy", {}), ("margin", {}),
              ("badge", {}), ("coreset", {}), ("bald", {"dropout": 0.2}),
              (RELEASED, {"relative_to": "proxy"}), ("mlmoc", {"relative_to": "proxy"}),
              (RELEASED, {"mode": "sequential"}), ("mlmoc", {"mode": "sequential"}),
              (RELEASED, {"proxy": "infinite-ntk"}), (RELEASED, {"proxy": "gp"}),
              (RELEASED, {"proxy": "one-step-sgd"}), ("emoc", {"probabilities": "softmax"})),
        description="every strategy, both references of the change, batch vs sequential, the "
                    "proxies of Fig. 1b, EMOC with softmax vs simplex probabilities; MLP 784-512-512-10"),
}


def configs(name: str, seeds: str | None = None, **overrides) -> list:
    """The :class:`~ntk_tutorial.active.run.ALConfig` of every (seed, run) of an experiment, in the
    order they run (seed-major)."""
    from .run import config_from_preset, parse_seeds

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    out = []
    for seed in parse_seeds(seeds or exp.seeds):
        for strategy, opts in exp.runs:
            extra = {**exp.extra, **({"cycles": exp.cycles} if exp.cycles else {}), **opts, **overrides}
            out.append(config_from_preset(exp.preset, strategy=strategy, seed=seed, **extra))
    return out
