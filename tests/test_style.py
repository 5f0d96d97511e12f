"""The code stays ruff-clean (conventions: Python)."""

import subprocess

from conftest import BIN, REPO


def test_ruff_clean():
    proc = subprocess.run([str(BIN / "ruff"), "check", "ript", "tests", "benchmarks"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
