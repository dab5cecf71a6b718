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
