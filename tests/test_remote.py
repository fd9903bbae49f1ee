"""Downloads against a loopback HTTP server serving small files in the real formats."""

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from scipy.io import savemat

from ntk_tutorial import data, remote


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def cifar_bytes(batches: dict[str, dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, batch in batches.items():
            payload = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def mat_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    savemat(buf, {"X": x, "y": y})
    return buf.getvalue()


class Loopback:
    """A threaded HTTP server on 127.0.0.1 (a free port) for ``handler``; a context manager."""

    def _serve(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class Server(Loopback):
    """Serves FILES[path] = bytes; '/stall/...' sends headers, then nothing for a while."""

    def __init__(self, files):
        files = files
        outer = self
        self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                if self.path.startswith("/stall/"):
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    time.sleep(3)  # bounded: the client times out after 1 s
                    return
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(Handler)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(remote.DATA_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(remote.TIMEOUT_ENV, "1")
    return tmp_path / "cache"


def _fake_mnist():
    rng = np.random.default_rng(0)
    x_tr, x_te = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    y_tr, y_te = np.arange(12) % 10, np.arange(5)
    names = [f.name for f in remote.REMOTE["mnist"].files]
    return dict(zip(names, [idx_bytes(x_tr), idx_bytes(y_tr), idx_bytes(x_te), idx_bytes(y_te)])), (x_tr, y_tr)


def _register(monkeypatch, name, files, url, prefix=""):
    rs = remote.REMOTE[name]
    new = tuple(replace(f, urls=(f"{url}/{prefix}{f.name}",), sha256=sha(files[f.name])) for f in rs.files)
    monkeypatch.setitem(remote.REMOTE, name, replace(rs, files=new))


def test_mnist_downloads_verifies_parses_and_caches(cache, monkeypatch):
    files, (x_tr, y_tr) = _fake_mnist()
    with Server({f"/{k}": v for k, v in files.items()}) as srv:
        _register(monkeypatch, "mnist", files, srv.url)
        ds = data.load("mnist", seed=0, normalize="none", progress=False)
        assert ds.x_train.shape == (12, 784) and ds.image_shape == (28, 28, 1)
        order = ds.info["train_index"]
        np.testing.assert_allclose(ds.x_train, x_tr[order].reshape(12, -1) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(ds.y_train, y_tr[order])
        hits = len(srv.hits)
        data.load("mnist", seed=1, progress=False)  # cached: no new request
        assert len(srv.hits) == hits
        # a corrupt cached file is detected by its hash and fetched again
        (cache / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
        assert not all(r["verified"] for r in remote.cached() if r["dataset"] == "mnist")
        data.load("mnist", seed=0, progress=False)
        assert len(srv.hits) == hits + 1
        assert all(r["verified"] for r in remote.cached() if r["dataset"] == "mnist")


def test_cifar_and_svhn_formats(cache, monkeypatch):
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": {b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8),
                                   b"labels": [i % 10, (i + 1) % 10]} for i in range(1, 6)}
    batches["test_batch"] = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), b"labels": [0, 1, 2]}
    cifar = {"cifar-10-python.tar.gz": cifar_bytes(batches)}
    x = rng.integers(0, 256, (32, 32, 3, 4)).astype(np.uint8)
    svhn = {"train_32x32.mat": mat_bytes(x, np.array([[10], [1], [2], [3]])),
            "test_32x32.mat": mat_bytes(x[..., :2], np.array([[10], [5]]))}
    with Server({f"/{k}": v for k, v in {**cifar, **svhn}.items()}) as srv:
        _register(monkeypatch, "cifar10", cifar, srv.url)
        _register(monkeypatch, "svhn", svhn, srv.url)
        (xc, yc), (xt, yt) = remote.load_arrays("cifar10", progress=False)
        assert xc.shape == (10, 32, 32, 3) and yc.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
        # CIFAR rows are channel-major: pixel (0, 0) of channel c is data[c * 1024]
        raw = batches["data_batch_1"][b"data"][0]
        assert xc[0, 0, 0].tolist() == [raw[0], raw[1024], raw[2048]]
        (xs, ys), _ = remote.load_arrays("svhn", progress=False)
        assert xs.shape == (4, 32, 32, 3) and ys.tolist() == [0, 1, 2, 3]  # label 10 means digit 0
        np.testing.assert_array_equal(xs[1], x[..., 1])


def test_wrong_hash_leaves_nothing_and_explains(cache, monkeypatch):
    files, _ = _fake_mnist()
    with Server({f"/{k}": v for k, v in files.items()}) as srv:
        _register(monkeypatch, "mnist", files, srv.url)
        bad = replace(remote.REMOTE["mnist"].files[0], sha256="0" * 64)
        with pytest.raises(remote.DownloadError) as err:
            remote.fetch_file(bad, cache / "mnist")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "place it as" in msg and str(cache) in msg
    assert not any((cache / "mnist").iterdir()), "no partial or unverified file may remain"


def test_stalled_server_times_out_and_no_network_names_file_url_and_folder(cache, monkeypatch):
    files, _ = _fake_mnist()
    with Server({}) as srv:
        stalled = replace(remote.REMOTE["mnist"].files[1], urls=(f"{srv.url}/stall/x.gz",))
        start = time.perf_counter()
        with pytest.raises(remote.DownloadError, match="timed out"):
            remote.fetch_file(stalled, cache / "m")
        assert time.perf_counter() - start < 10
        assert not any((cache / "m").iterdir())
    # nothing listens on this port any more: a refused connection, like no network
    gone = replace(remote.REMOTE["mnist"].files[1], urls=(f"{srv.url}/t.gz",))
    with pytest.raises(remote.DownloadError, match=r"(?s)could not download .*place it as .*NTK_TUTORIAL_DATA"):
        remote.fetch_file(gone, cache / "m")


def test_cli_data_list_and_fetch_unknown(cache):
    out = subprocess.run([sys.executable, "-m", "ntk_tutorial.cli", "data", "list"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "cifar10" in out.stdout and "missing" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ntk_tutorial.cli", "data", "fetch", "imagenet"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown remote data set 'imagenet'" in bad.stderr  # a usage error
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_idx_parser_rejects_garbage(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        remote.read_idx(p)


class Trickle(Loopback):
    """A loopback server that sends one byte every ``gap`` seconds, for at most ``limit`` seconds
    (so a client without an overall deadline fails on a short body, never hangs the tests)."""

    def __init__(self, gap=0.3, limit=20.0):
        outer = self
        self.sent = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                start = time.monotonic()
                try:
                    while time.monotonic() - start < limit:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        outer.sent += 1
                        time.sleep(gap)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._serve(Handler)


def test_a_trickling_host_hits_the_overall_deadline(cache, monkeypatch):
    """A mirror sending a byte every two seconds kept `data fetch` alive far past its timeout:
    the timeout is per read, each byte resets it.  The overall deadline stops it, leaves no
    partial file and says so."""
    monkeypatch.setenv(remote.TIMEOUT_ENV, "5")  # longer than the gaps: only the deadline can stop it
    monkeypatch.setenv(remote.DEADLINE_ENV, "1.5")
    with Trickle(gap=0.3, limit=20.0) as srv:
        slow = replace(remote.REMOTE["mnist"].files[1], urls=(f"{srv.url}/t.gz",))
        with pytest.raises(remote.DownloadError, match=r"overall deadline of 1\.5 s.*NTK_TUTORIAL_DOWNLOAD_DEADLINE"):
            remote.fetch_file(slow, cache / "m")
        assert 0 < srv.sent < 100  # it was reading, and stopped long before the body's end
    assert not any((cache / "m").iterdir()), "no partial file may remain"
    monkeypatch.setenv(remote.DEADLINE_ENV, "soon")
    with pytest.raises(ValueError, match="NTK_TUTORIAL_DOWNLOAD_DEADLINE must be a number of seconds"):
        remote.fetch_file(slow, cache / "m")


def test_mnist_tries_a_working_mirror_first_and_names_it_offline(cache):
    """The first host tried for MNIST (yann.lecun.com) has answered 403 for years: a working
    mirror comes first, is the one the offline message names, and the original host is last."""
    for f in remote.REMOTE["mnist"].files:
        hosts = [u.rsplit("/", 1)[0] + "/" for u in f.urls]
        assert hosts[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
        assert "yann.lecun.com" in hosts[-1] and len(set(hosts)) == len(hosts) == 3
        assert all(u.endswith("/" + f.name) for u in f.urls) and len(f.sha256) == 64
    dead = replace(remote.REMOTE["mnist"].files[1],
                   urls=tuple("http://127.0.0.1:9/" + u.split("://", 1)[1] for u in remote.REMOTE["mnist"].files[1].urls))
    with pytest.raises(remote.DownloadError) as err:
        remote.fetch_file(dead, cache / "m")
    assert "download it elsewhere from http://127.0.0.1:9/ossci-datasets.s3.amazonaws.com/mnist/" in str(err.value)
    assert "\n" not in str(err.value)  # one line
