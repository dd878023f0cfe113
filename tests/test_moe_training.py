"""Training a mixture-of-experts model end to end on CPU processes: from a converted Qwen3-MoE checkpoint, in
bf16 with the distributed optimizer at EP = 2, a co-located MoE reference scoring merged micro-batches (step-1
weights exactly 1, m_theta exactly 0), a bit-for-bit resume, and a checkpoint saved at EP = 2 starting an EP = 1
run (its weights; its optimizer state does not load across ep=1, which is refused in one line)."""

import shutil
import subprocess
import sys

import pytest

from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.train_workers import metrics, run_commands, tiny_config

STEPS = 3


@pytest.fixture(scope="module")
def start(tmp_path_factory, data_prefix):
    """(config, starting checkpoint converted from a tiny Qwen3-MoE in bf16)."""
    root = tmp_path_factory.mktemp("moe_train")
    hf = make_hf_model("qwen3_moe", str(root / "hf"), vocab_size=1024)
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import hf_to_megatron; "
                    "hf_to_megatron(sys.argv[1], sys.argv[2], dtype='bf16', log=lambda *_: None)", hf,
                    str(root / "init")], check=True, timeout=300)
    config = tiny_config(root, data_prefix, model={}, optimizer={"lr": 1e-3},
                         data={"seq_length": 128, "micro_batch_size": 2, "global_batch_size": 8},
                         reference={"precision": "bf16", "micro_batch_size": 4})
    import yaml

    settings = yaml.safe_load(open(config))
    del settings["model"]  # the checkpoint's
    open(config, "w").write(yaml.safe_dump(settings))
    return config, str(root / "init")


def args(config, init, out, *extra):
    return ["--config", config, f"checkpoint.init={init}", f"train_steps={STEPS}", f"output_dir={out}",
            "precision.dtype=bf16", "optimizer.distributed=true", "model.spec=local", "parallel.ep=2",
            "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001",
            "checkpoint.optimizer_sharding=fully_reshardable", *extra]


def test_bf16_distributed_optimizer_at_ep2_resumes_bitwise_and_at_ep1(tmp_path, start):
    config, init = start
    straight, halves, ep1 = tmp_path / "straight", tmp_path / "halves", tmp_path / "ep1"
    spawn(2, run_commands, [
        ("train", args(config, init, straight)),
        ("train", args(config, init, halves, "stop_at_step=2")),
    ], out_dir=tmp_path / "job", timeout=400)
    rows = metrics(straight)
    assert rows[0]["weight_min"] == rows[0]["weight_max"] == 1.0 and rows[0]["m_theta"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[1]["m_theta"] != 0.0
    assert all(r["moe_max_load"] >= 1.0 and r["moe_load_balancing_loss"] > 0 and r["moe_z_loss"] > 0 for r in rows)
    saved_at_ep2 = str(halves / "checkpoints" / "iter_0000002")
    shutil.copytree(saved_at_ep2, tmp_path / "kept")
    spawn(2, run_commands, [("train", args(config, init, halves)),
                            ("train", args(config, str(tmp_path / "kept"), ep1, "parallel.ep=1", "train_steps=1"))],
          out_dir=tmp_path / "resume", timeout=400)
    assert metrics(halves) == rows  # bit for bit
    started = metrics(ep1)  # the EP = 2 weights at EP = 1, as policy and reference: weights exactly 1 again
    assert started[0]["weight_min"] == started[0]["weight_max"] == 1.0 and started[0]["m_theta"] == 0.0
    assert started[0]["loss"] < rows[0]["loss"]  # trained weights, not the starting ones


def test_resume_across_ep1_is_refused_in_one_line():
    from minorsft_megatron.checkpoint import CheckpointError
    from minorsft_megatron.config import TrainConfig
    from minorsft_megatron.train import check_resumed_optimizer

    cfg = TrainConfig()
    cfg.optimizer.distributed = True
    saved = {"optimizer_sharding": "fully_reshardable", "layout": {"tp": 1, "pp": 1, "cp": 1, "ep": 2, "world": 2}}
    with pytest.raises(CheckpointError, match=r"^CKPT: saved at ep=2, this run has ep=1: .*checkpoint.init: CKPT$"):
        check_resumed_optimizer(cfg, saved, "CKPT")
