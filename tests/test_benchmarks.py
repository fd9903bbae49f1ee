"""Every benchmark script runs in --quick mode, writes its JSON, and exits non-zero when a
measurement fails (benchmarks print ratios; tests never assert on wall-clock time)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("kernels.py", "conv_kernels.py", "lookahead.py", "active.py", "presets.py")


def run(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, capture_output=True,
                          text=True, timeout=timeout)


def test_every_benchmark_script_is_tested():
    assert sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py") == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs_and_writes_json(script, tmp_path):
    out = tmp_path / "result.json"
    res = run(script, "--quick", "--output", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["quick"] is True and "machine" in payload
    assert "all measurements ran" in res.stdout


def test_a_failed_measurement_exits_non_zero(tmp_path):
    res = run("active.py", "--quick", "--strategies", "random", "no-such-strategy",
              "--output", str(tmp_path / "a.json"))
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "no-such-strategy" in res.stdout
