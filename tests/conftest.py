import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    """The device tests compute on: MINORSFT_TEST_DEVICE, else CUDA when present, else the CPU."""
    return os.environ.get("MINORSFT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
