"""The supported megatron-core versions: refused outside them in one line, quiet inside them."""

import logging
import subprocess
import sys

import pytest

from minorsft_megatron.compat import MegatronVersionError, check_megatron_version, megatron_version
from tests.tokenizers_for_tests import REPO


@pytest.mark.parametrize("version", [(0, 16, 1), (0, 16, 3), (0, 19, 0), (0, 19, 2)])
def test_supported_versions_pass(version):
    check_megatron_version(version)


@pytest.mark.parametrize("version", [(0, 16, 0), (0, 17, 0), (0, 18, 2), (0, 20, 0), (1, 0, 0)])
def test_other_versions_are_refused_in_one_line(version):
    with pytest.raises(MegatronVersionError) as err:
        check_megatron_version(version)
    text = str(err.value)
    assert text.startswith(f"megatron-core {'.'.join(map(str, version))} is installed; minorsft-megatron supports "
                           "and tests 0.16.x (from 0.16.1) or 0.19.x: pip install") and "\n" not in text


def test_the_installed_version_is_supported_and_a_command_refuses_another():
    check_megatron_version()
    script = ("import sys, minorsft_megatron.compat as c; c.megatron_version = lambda: (0, 18, 0); "
              "from minorsft_megatron import train; sys.exit(train.main(['--config', 'nowhere.yaml']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: megatron-core 0.18.0 is installed; minorsft-megatron supports "
                                                "and tests 0.16.x (from 0.16.1) or 0.19.x: pip install "
                                                "'megatron-core==0.16.1' (Python 3.10/3.11) or 'megatron-core==0.19.2'"]


def test_building_and_saving_a_model_logs_no_notice_a_user_cannot_act_on(tmp_path):
    """megatron-core 0.19 logs 'GPTModel IS DEPRECATED' for every GPTModel and 'async save is deprecated' from its
    own synchronous save; neither reaches a user of this package (see docs/megatron-versions.md)."""
    from tests.distributed import spawn

    messages = spawn(1, _build_and_save, str(tmp_path / "ckpt"), out_dir=tmp_path / "job")[0]
    assert not [m for m in messages if "deprecated" in m.lower()], (megatron_version(), messages)


def _build_and_save(path: str) -> list[str]:
    """The warnings megatron-core logs while a tiny model is built and saved."""
    from minorsft_megatron import checkpoint, parallel
    from minorsft_megatron.config import TrainConfig
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.model import build_model
    from minorsft_megatron.transformer_engine import RolePrecision

    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("megatron").addHandler(handler)
    device = setup_device("cpu")
    parallel.initialize(device)
    cfg = TrainConfig()
    cfg.model.spec = "local"
    model, _ = build_model(cfg, RolePrecision("fp32"), 64, device, initialize=True)
    checkpoint.save(path, 0, model, None, {"config": {}})
    return messages
