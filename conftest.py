"""Repository-wide pytest set-up: notebooks run in fast mode, headless, figures kept apart."""

import os

os.environ.setdefault("NTK_TUTORIAL_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
