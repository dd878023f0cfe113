import os

import pytest
import torch

from tests.process_cleanup import pytest_configure, pytest_sessionfinish  # noqa: F401 (hooks: no process left)
from tests.tokenizers_for_tests import DATA, SENTENCEPIECE_MODEL


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


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory):
    """The bundled training records preprocessed with the bundled tokenizer (chatml, 128 positions)."""
    from minorsft_megatron.data.preprocess import PreprocessSettings, preprocess

    prefix = str(tmp_path_factory.mktemp("data") / "train")
    preprocess(PreprocessSettings(inputs=[os.path.join(DATA, "sft_train.jsonl")], tokenizer=SENTENCEPIECE_MODEL,
                                  output_prefix=prefix, chat_template="chatml", seq_length=128),
               log=lambda *_: None)
    return prefix
