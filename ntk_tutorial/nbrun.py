"""Running notebooks headless the way Jupyter does, for ``ntk-tutorial reproduce`` and ``site``.

* Kernels use matplotlib's *inline* backend (what Jupyter and Colab use), so every
  ``plt.show()`` leaves its image in the executed copy; :func:`~ntk_tutorial.plotting.save_figure`
  writes the same files as under ``Agg`` (both render with Agg and the package's style sets the
  sizes).
* On Linux and macOS kernels talk over private Unix sockets (IPC) rather than TCP on localhost,
  so nothing is sent in plain text and the kernel's "running over TCP without encryption"
  warning has no reason to appear; elsewhere the kernel's own log is kept to errors.
* :class:`CellProgress` shows which cell of which notebook runs, and a cell that times out is
  named by its number and first line.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
METADATA_KEY = "ntk_tutorial"  # notebook metadata written on every executed copy: {"mode": ...}


def use_inline_backend() -> None:
    """Kernels started from now on by this process draw with the inline backend."""
    os.environ["MPLBACKEND"] = INLINE_BACKEND


def kernel_config(socket_dir: str | os.PathLike | None = None):
    """traitlets ``Config`` for the kernel manager: IPC transport in a private folder on POSIX,
    the kernel's log at ERROR elsewhere (Windows has no Unix sockets).  A folder this function
    makes itself (no ``socket_dir``) is removed when the process exits."""
    from traitlets.config import Config

    config = Config()
    if os.name == "posix":
        if socket_dir:
            folder = Path(socket_dir)
        else:
            folder = Path(tempfile.mkdtemp(prefix="ntk-tutorial-kernel-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(folder / "kernel")
    return config


def kernel_arguments() -> list[str]:
    """Extra kernel arguments: the kernel's own log at ERROR where the transport is TCP."""
    return [] if os.name == "posix" else ["--IPKernelApp.log_level=ERROR"]


def cell_label(nb, index: int) -> str:
    """``cell 12 ('first line of the cell')``: how a cell is named in messages."""
    source = nb.cells[index].source.strip().splitlines() if 0 <= index < len(nb.cells) else []
    head = source[0] if source else ""
    return f"cell {index} ({head[:60]!r})"


class CellProgress:
    """nbclient hooks that draw a progress bar over the code cells of one notebook and remember
    the cell that runs (so a timeout can name it)."""

    def __init__(self, nb, name: str, *, file=None, enabled: bool = True):
        from tqdm.auto import tqdm

        self.nb = nb
        self.current: int | None = None
        total = sum(1 for c in nb.cells if c.cell_type == "code")
        self.bar = tqdm(total=total, desc=f"  {name}", unit="cell", leave=False, position=1,
                        file=file or sys.stdout, disable=not enabled, dynamic_ncols=True)

    def on_cell_start(self, cell, cell_index, **_):
        if cell.cell_type != "code":  # nbclient calls this for Markdown cells too
            return
        self.current = cell_index
        head = cell.source.strip().splitlines()
        self.bar.set_postfix_str(f"cell {cell_index}: {head[0][:40] if head else ''}", refresh=True)

    def on_cell_executed(self, cell, cell_index, **_):
        self.bar.update(1)

    def hooks(self) -> dict:
        return {"on_cell_start": self.on_cell_start, "on_cell_executed": self.on_cell_executed}

    def close(self) -> None:
        self.bar.close()

    def where(self) -> str:
        return cell_label(self.nb, self.current) if self.current is not None else "before the first cell"
