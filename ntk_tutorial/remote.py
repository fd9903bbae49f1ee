"""Real data sets downloaded from their canonical hosts: MNIST, Fashion-MNIST, SVHN, CIFAR-10/100.

Files go through :func:`fetch_file`, which

* downloads through pooch with a timeout per read and an overall deadline per file (never
  hangs, not even on a host that trickles a byte at a time) to a temporary name in the cache,
  checks the file's SHA-256 against the registry, and only then renames it into place (never a
  partial file);
* re-downloads a cached file whose hash does not match (a corrupt or truncated cache);
* without a network, raises :class:`DownloadError` naming the file, the URLs tried and the
  directory to place the file in by hand.

The cache is ``$NTK_TUTORIAL_DATA`` if set, else ``~/.cache/ntk-tutorial`` (pooch's
per-platform cache).  Parsers read the original formats with numpy (IDX, CIFAR pickles) and
scipy (SVHN ``.mat``) into the same :class:`~ntk_tutorial.data.Dataset` as the offline sets.

SHA-256 values are those published in TensorFlow Datasets' URL checksum files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

DATA_ENV = "NTK_TUTORIAL_DATA"
TIMEOUT_ENV = "NTK_TUTORIAL_DOWNLOAD_TIMEOUT"
# Overall limit per file, in seconds (default: 120 s plus the file at 100 kB/s): a host that
# sends a byte now and then never trips the per-read timeout, this stops it.
DEADLINE_ENV = "NTK_TUTORIAL_DOWNLOAD_DEADLINE"
_MIN_RATE = 100e3  # bytes per second a download must average for the default deadline


class DownloadError(RuntimeError):
    """A file could not be downloaded or failed its hash check."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    urls: tuple[str, ...]  # tried in order: a working host first (named in the offline message)
    sha256: str
    size: int | None = None  # bytes, for information


def cache_dir() -> Path:
    """``$NTK_TUTORIAL_DATA`` or the platform cache folder ``.../ntk-tutorial``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("ntk-tutorial"))


def sha256sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${env} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"${env} must be a positive number of seconds, got {text!r}")
    return value


def _timeout() -> float:
    return _seconds(TIMEOUT_ENV, 30.0)


def _deadline(remote: RemoteFile) -> float:
    """Seconds one file may take in all (``$NTK_TUTORIAL_DOWNLOAD_DEADLINE``, else 120 s plus its
    size at 100 kB/s)."""
    return _seconds(DEADLINE_ENV, 120.0 + (remote.size or 0) / _MIN_RATE)


class DeadlineExceeded(DownloadError):
    """A download still unfinished when its overall deadline passed."""


class _DeadlineDownloader:
    """A pooch downloader (``requests`` streaming) with a timeout per read *and* an overall
    deadline: the body is read with ``read1`` (whatever has arrived, never waiting for a full
    chunk), so the deadline is checked however slowly the host sends."""

    def __init__(self, timeout: float, deadline: float, progressbar: bool = False):
        self.timeout, self.deadline, self.progressbar = timeout, deadline, progressbar

    def __call__(self, url, output_file, pooch, check_only=False):
        import time

        import requests

        if check_only:
            return requests.head(url, timeout=self.timeout, allow_redirects=True).status_code == 200
        end = time.monotonic() + self.deadline
        ispath = not hasattr(output_file, "write")
        out = open(output_file, "w+b") if ispath else output_file
        try:
            with requests.get(url, timeout=self.timeout, stream=True) as response:
                response.raise_for_status()
                raw = response.raw
                read = getattr(raw, "read1", None) or (lambda n, decode_content=True: raw.read(min(n, 1024), decode_content=decode_content))
                total = int(response.headers.get("content-length", 0) or 0)
                bar = None
                if self.progressbar:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=total, unit="B", unit_scale=True, leave=True, ncols=79)
                try:
                    while True:
                        if time.monotonic() > end:
                            raise DeadlineExceeded(
                                f"not finished after the overall deadline of {self.deadline:g} s "
                                f"(${DEADLINE_ENV}); the host is too slow")
                        chunk = read(1 << 16, decode_content=True)
                        if not chunk:
                            break
                        out.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
                out.flush()
        finally:
            if ispath:
                out.close()
        return None


def fetch_file(remote: RemoteFile, folder: Path | None = None, *, progress: bool = False) -> Path:
    """Return the path of ``remote`` in the cache, downloading and verifying it if needed.

    Uses ``pooch.retrieve`` for each URL in turn (a working mirror first): pooch downloads to a
    temporary file, checks the SHA-256 and only then moves it into place, and re-downloads a
    cached file whose hash does not match.  Every read has a timeout
    (``$NTK_TUTORIAL_DOWNLOAD_TIMEOUT`` seconds, default 30) and every file an overall deadline
    (``$NTK_TUTORIAL_DOWNLOAD_DEADLINE``), so neither a dead host nor a trickling one hangs.
    """
    import pooch

    folder = Path(folder) if folder is not None else cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as err:
        raise DownloadError(
            f"cannot write to the data cache {folder} ({err.strerror or err}); set ${DATA_ENV} to a writable "
            "folder") from None
    target = folder / remote.name
    pooch.get_logger().setLevel("WARNING")
    errors = []
    downloader = _DeadlineDownloader(_timeout(), _deadline(remote), progressbar=progress)
    for url in remote.urls:
        try:
            path = pooch.retrieve(
                url, known_hash=f"sha256:{remote.sha256}", fname=remote.name, path=folder,
                downloader=downloader,
            )
            return Path(path)
        except Exception as err:  # noqa: BLE001 - requests/pooch raise many kinds; all mean "failed"
            errors.append(f"{url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise DownloadError(
        f"could not download {remote.name} (tried: " + "; ".join(errors) + "). "
        f"Without a network, download it elsewhere from {remote.urls[0]} and place it as "
        f"{target} (sha256 {remote.sha256}); set ${DATA_ENV} to use another folder."
    )


# ---------------------------------------------------------------------------------------------
# parsers of the original formats
# ---------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): MNIST's format (magic, dims, big-endian payload)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)} but holds {data.size} values")
    return data.reshape(tuple(dims))


def _read_cifar_tar(path: Path, members: dict[str, str], label_key: bytes):
    out = {}
    with tarfile.open(path, "r:gz") as tar:
        names = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        for split, wanted in members.items():
            xs, ys = [], []
            for member in wanted.split(","):
                if member not in names:
                    raise ValueError(f"{path} lacks {member}: not a CIFAR python archive")
                batch = pickle.load(tar.extractfile(names[member]), encoding="bytes")
                xs.append(np.asarray(batch[b"data"], np.uint8))
                ys.append(np.asarray(batch[label_key], np.int64))
            x = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            out[split] = (x, np.concatenate(ys))
    return out


def _idx_set(files):
    x_tr, y_tr, x_te, y_te = (read_idx(f) for f in files)
    return (x_tr[..., None], y_tr), (x_te[..., None], y_te)


def _cifar10(files):
    d = _read_cifar_tar(files[0], {"train": ",".join(f"data_batch_{i}" for i in range(1, 6)),
                                   "test": "test_batch"}, b"labels")
    return d["train"], d["test"]


def _cifar100(files):
    d = _read_cifar_tar(files[0], {"train": "train", "test": "test"}, b"fine_labels")
    return d["train"], d["test"]


def _svhn(files):
    from scipy.io import loadmat

    def one(path):
        m = loadmat(path)
        x = np.transpose(m["X"], (3, 0, 1, 2))  # stored (32, 32, 3, n)
        y = m["y"].reshape(-1).astype(np.int64) % 10  # the digit 0 is stored as label 10
        return x, y

    return one(files[0]), one(files[1])


# Working mirrors first: PyTorch's (torchvision's MNIST mirror, the only source PyTorch's own CI
# keeps since 2025, pytorch/pytorch#164238), then TensorFlow Datasets' (whose checksum file the
# SHA-256 values come from); the original host has answered 403 (and later 404) since 2024
# (pytorch/vision#8568), so it is tried last.  The hashes are the same files' whatever the host.
_MNIST_HOSTS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def _files(hosts, spec):
    return tuple(RemoteFile(n, tuple(h + n for h in hosts), s, z) for n, s, z in spec)


@dataclass(frozen=True)
class RemoteSet:
    files: tuple[RemoteFile, ...]
    parse: Callable
    num_classes: int
    description: str


REMOTE: dict[str, RemoteSet] = {
    "mnist": RemoteSet(_files(_MNIST_HOSTS, [
        ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
        ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
        ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
        ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
    ]), _idx_set, 10, "MNIST (LeCun et al.), 60 000 + 10 000 digits, 28x28"),
    "fashion-mnist": RemoteSet(_files((_FASHION,), [
        ("train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
        ("train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
        ("t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
        ("t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
    ]), _idx_set, 10, "Fashion-MNIST (Xiao et al. 2017), 60 000 + 10 000 images, 28x28"),
    "svhn": RemoteSet(_files(("http://ufldl.stanford.edu/housenumbers/",), [
        ("train_32x32.mat", "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8", 182040794),
        ("test_32x32.mat", "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b", 64275384),
    ]), _svhn, 10, "SVHN cropped digits (Netzer et al. 2011), 73 257 + 26 032 images, 32x32x3"),
    "cifar10": RemoteSet(_files(("https://www.cs.toronto.edu/~kriz/",), [
        ("cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170498071),
    ]), _cifar10, 10, "CIFAR-10 (Krizhevsky 2009), 50 000 + 10 000 images, 32x32x3"),
    "cifar100": RemoteSet(_files(("https://www.cs.toronto.edu/~kriz/",), [
        ("cifar-100-python.tar.gz", "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7", 169001437),
    ]), _cifar100, 100, "CIFAR-100 (Krizhevsky 2009), 50 000 + 10 000 images, 32x32x3, fine labels"),
}


def folder_for(name: str) -> Path:
    return cache_dir() / name


def fetch(name: str, *, progress: bool = True) -> list[Path]:
    """Download (if needed) and verify every file of a remote data set; return their paths."""
    if name not in REMOTE:
        import difflib

        close = difflib.get_close_matches(name, sorted(REMOTE), n=1)
        raise ValueError(f"unknown remote data set {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; available: {', '.join(sorted(REMOTE))}")
    return [fetch_file(f, folder_for(name), progress=progress) for f in REMOTE[name].files]


def load_arrays(name: str, *, progress: bool = True):
    """``((x_train uint8 (n,H,W,C), y_train), (x_test, y_test))`` from the original files."""
    return REMOTE[name].parse(fetch(name, progress=progress))


def cached() -> list[dict]:
    """What is in the cache: per data set, its files, whether each is present and verified."""
    rows = []
    for name, rs in sorted(REMOTE.items()):
        for f in rs.files:
            path = folder_for(name) / f.name
            present = path.exists()
            rows.append(dict(dataset=name, file=f.name, present=present,
                             bytes=path.stat().st_size if present else 0,
                             verified=present and sha256sum(path) == f.sha256))
    return rows


def remove(name: str) -> None:
    """Delete a data set's cached files."""
    shutil.rmtree(folder_for(name), ignore_errors=True)
