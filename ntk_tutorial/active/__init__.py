"""Active learning with look-ahead (issue 5): query strategies and the experiment runner.

* :mod:`ntk_tutorial.active.strategies`: ``STRATEGIES[name](ctx, budget, key) -> indices``.
* :mod:`ntk_tutorial.active.run`: ``run_experiment(config, out_dir)``, ``PRESETS``, resumable
  JSON-lines results (CLI ``ntk-tutorial al``).
* :mod:`ntk_tutorial.active.plot`: accuracy vs labels, area under the curve (``ntk-tutorial al-plot``).
"""

from .strategies import STRATEGIES, Context  # noqa: F401
