"""Shared fixtures: the offline models, loaded once per test session."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The own kernels wherever they apply, not timed per shape: the same code paths on every run, and no timings taken
# on a busy test machine written to the user's choice cache (tests/test_kernel_choice.py tests the choice itself).
os.environ.setdefault("CYCLELAB_KERNELS", "own")

import pytest
from float_bounds import own_kernels  # noqa: F401 - a fixture: the test runs with the own kernels on and off

from cyclelab import load
from cyclelab.core.engine import Engine


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (full course profiles, minutes each) run only with CYCLELAB_SLOW=1."""
    if os.environ.get("CYCLELAB_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set CYCLELAB_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    return load("tiny")


@pytest.fixture(scope="session")
def smollm2():
    return load("smollm2")


@pytest.fixture(scope="session")
def smollm2_sdpa():
    return load("smollm2", attn="sdpa")


@pytest.fixture(scope="session")
def minilm():
    return load("minilm")


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    return Engine(tiny)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    return Engine(smollm2)
