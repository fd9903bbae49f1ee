"""Active learning with look-ahead (issue 5): query strategies and the experiment runner.

* :mod:`ntk_tutorial.active.strategies`: ``STRATEGIES[name](ctx, budget, key) -> indices``.
* :mod:`ntk_tutorial.active.run`: ``run_experiment(config, out_dir)``, ``PRESETS``, resumable
  JSON-lines results (CLI ``ntk-tutorial al``).
* :mod:`ntk_tutorial.active.plot`: accuracy vs labels, area under the curve (``ntk-tutorial al-plot``).
* :mod:`ntk_tutorial.active.experiments`: the shipped experiments notebook 04 reads.

``STRATEGIES`` and ``Context`` are loaded on first use, so that ``ntk-tutorial al-reproduce
--list`` (which reads only ``experiments``) imports no JAX.
"""


def __getattr__(name: str):
    if name in ("STRATEGIES", "Context"):
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
