"""Shared by the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """CPU count, platform and the JAX device the numbers were measured on."""
    import jax

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "device": str(jax.devices()[0])}


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` plus the machine description as indented JSON; print where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=1) + "\n")
    print(f"\nwrote {path}")
    return path


def finish(failures: list[str], *, quick: bool) -> None:
    """Exit: status 1 when a measurement failed (an error, or in a full run a missed target),
    printing each; ``--quick`` runs are smoke checks at small sizes, so only errors count there."""
    import sys

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nall measurements " + ("ran (quick mode: targets are not checked at these sizes)" if quick
                                   else "met their targets"))
