"""ntk-tutorial: empirical neural tangent kernels, taught and reproduced in notebooks.

Modules: :mod:`~ntk_tutorial.kernels` (eNTK, pNTK, trace and single-logit kernels, infinite-width
NTK/NNGP), :mod:`~ntk_tutorial.models` (nnx MLP/CNN and the ``apply_fn(params, x)`` interface),
:mod:`~ntk_tutorial.train` (GD/SGD that records learning paths), :mod:`~ntk_tutorial.data`
(offline data sets), :mod:`~ntk_tutorial.plotting`, :mod:`~ntk_tutorial.config` (fast mode).
"""

from .config import enable_x64, is_fast, pick

__version__ = "0.1.0"
__all__ = ["pick", "is_fast", "enable_x64", "__version__"]
