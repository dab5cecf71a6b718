import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
PARITY = DATA / "decoder_parity"

# Tests share 2 cores with whatever else runs; one thread per test process keeps timings sane.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


# CI (.ci/run) sets WHISFUSION_FAIL_ON_SKIP=1: a skipped test means a missing install step, and must not
# pass for green. Locally a skip stays a skip, with its reason in the summary (addopts has -ra).
FAIL_ON_SKIP = os.environ.get("WHISFUSION_FAIL_ON_SKIP") == "1"


def _skipped(session) -> list:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    return reporter.stats.get("skipped", []) if reporter is not None else []


def pytest_sessionfinish(session, exitstatus):
    if FAIL_ON_SKIP and _skipped(session) and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if FAIL_ON_SKIP and skipped:
        terminalreporter.write_line(
            f"error: {len(skipped)} test(s) skipped; WHISFUSION_FAIL_ON_SKIP=1 counts a skip as a failure "
            "(see the skip reasons above: usually a system package missing from .ci/system-packages.sh)", red=True)
