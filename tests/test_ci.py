"""CI's own guard: with WHISFUSION_FAIL_ON_SKIP=1 (set by .ci/run) a skipped test fails the run."""

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).parent / "conftest.py"


def _run_pytest(tmp_path: Path, fail_on_skip: bool) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\ndef test_runs():\n    assert True\n\ndef test_skips():\n    pytest.skip('no voice')\n")
    env = dict(os.environ, WHISFUSION_FAIL_ON_SKIP="1" if fail_on_skip else "0")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_ci(tmp_path):
    run = _run_pytest(tmp_path, fail_on_skip=True)
    assert run.returncode == 1, run.stdout
    assert "1 passed, 1 skipped" in run.stdout and "counts a skip as a failure" in run.stdout


def test_a_skip_is_only_a_skip_locally(tmp_path):
    run = _run_pytest(tmp_path, fail_on_skip=False)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 1 skipped" in run.stdout and "counts a skip" not in run.stdout
