"""Training a mixture-of-experts model end to end on CPU processes: from a converted Qwen3-MoE checkpoint, in
bf16 with the distributed optimizer at EP = 2, a co-located MoE reference scoring merged micro-batches (step-1
weights exactly 1, m_theta exactly 0), a bit-for-bit resume, and a checkpoint saved at EP = 2 resumed at EP = 1
(weights and optimizer state: the next update is the EP = 2 run's) and starting a new EP = 1 run."""

import shutil
import subprocess
import sys

import pytest

from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.test_convert import tensors
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


def hf_weights(checkpoint_dir, out):
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import megatron_to_hf; "
                    "megatron_to_hf(sys.argv[1], sys.argv[2], dtype='fp32', log=lambda *_: None)",
                    str(checkpoint_dir), str(out)], check=True, timeout=300)
    return tensors(str(out))


def update_difference(a: dict, b: dict, before: dict) -> float:
    """How far two runs' last updates (a - before, b - before) are apart, relative to the update's size (mean
    absolute values over every weight: bf16 weights round single elements by a whole unit)."""
    gap = sum(float((a[n] - b[n]).abs().sum()) for n in a)
    return gap / sum(float((a[n] - before[n]).abs().sum()) for n in a)


def test_bf16_distributed_optimizer_at_ep2_resumes_bitwise_and_at_ep1(tmp_path, start):
    config, init = start
    straight, halves, ep1, fresh = tmp_path / "straight", tmp_path / "halves", tmp_path / "ep1", tmp_path / "fresh"
    spawn(2, run_commands, [
        ("train", args(config, init, straight)),
        ("train", args(config, init, halves, "stop_at_step=2")),
    ], out_dir=tmp_path / "job", timeout=400)
    rows = metrics(straight)
    assert rows[0]["weight_min"] == rows[0]["weight_max"] == 1.0 and rows[0]["m_theta"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[1]["m_theta"] != 0.0
    assert all(r["moe_max_load"] >= 1.0 and r["moe_load_balancing_loss"] > 0 and r["moe_z_loss"] > 0 for r in rows)
    saved_at_ep2 = halves / "checkpoints" / "iter_0000002"
    shutil.copytree(saved_at_ep2, tmp_path / "kept")
    shutil.copytree(halves, ep1, ignore=shutil.ignore_patterns("iter_0000003*"))
    spawn(2, run_commands, [("train", args(config, init, halves)),
                            ("train", args(config, init, ep1, "parallel.ep=1")),
                            ("train", args(config, str(tmp_path / "kept"), fresh, "parallel.ep=1", "train_steps=1"))],
          out_dir=tmp_path / "resume", timeout=400)
    assert metrics(halves) == rows  # bit for bit
    resumed = metrics(ep1)  # the EP = 2 run's step 3 at EP = 1: the same weights, so about the same loss
    assert resumed[:2] == rows[:2] and abs(resumed[2]["loss"] - rows[2]["loss"]) <= 1e-2 * rows[2]["loss"]
    before = hf_weights(tmp_path / "kept", tmp_path / "hf_before")
    at_ep2 = hf_weights(straight / "checkpoints" / "iter_0000003", tmp_path / "hf_ep2")
    at_ep1 = hf_weights(ep1 / "checkpoints" / "iter_0000003", tmp_path / "hf_ep1")
    fresh_optimizer = hf_weights(fresh / "checkpoints" / "iter_0000001", tmp_path / "hf_fresh")
    # the step used the saved Adam moments (measured 1.4e-4; with a new optimizer, 0.92)
    assert update_difference(at_ep1, at_ep2, before) <= 1e-2 < update_difference(fresh_optimizer, at_ep2, before)
    started = metrics(fresh)  # the EP = 2 weights at EP = 1 in a new run, as policy and reference: weights 1 again
    assert started[0]["weight_min"] == started[0]["weight_max"] == 1.0 and started[0]["m_theta"] == 0.0
    assert started[0]["loss"] < rows[0]["loss"]  # trained weights, not the starting ones


def test_an_ep1_moe_checkpoint_of_an_earlier_version_is_refused_in_one_line():
    from minorsft_megatron.checkpoint import CheckpointError
    from minorsft_megatron.config import TrainConfig
    from minorsft_megatron.train import check_resumed_optimizer

    cfg = TrainConfig()
    cfg.optimizer.distributed, cfg.model.num_experts, cfg.parallel.ep = True, 8, 2
    saved = {"optimizer_sharding": "fully_reshardable", "layout": {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "world": 2}}
    with pytest.raises(CheckpointError, match=r"^CKPT: an MoE run saved at ep=1 by an earlier version.*: CKPT$"):
        check_resumed_optimizer(cfg, saved, "CKPT")
    check_resumed_optimizer(cfg, dict(saved, layout=dict(saved["layout"], expert_optimizer=True)), "CKPT")


def test_score_of_an_moe_checkpoint_matches_transformers(tmp_path, start, data_prefix):
    """`score` on a converted Qwen3-MoE checkpoint (fp32, 2 processes): each sample's answer log-prob sum and
    answer-token count against the transformers model in float64."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from minorsft_megatron.data.dataset import SFTDataset

    hf = str(Path(start[1]).parent / "hf")
    init = str(tmp_path / "init_fp32")
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import hf_to_megatron; "
                    "hf_to_megatron(sys.argv[1], sys.argv[2], dtype='fp32', log=lambda *_: None)", hf, init],
                   check=True, timeout=300)
    out = str(tmp_path / "scores.jsonl")
    spawn(2, run_commands, [("score", ["--load", init, "--data", data_prefix, "--out", out, "--precision", "fp32"])],
          out_dir=tmp_path / "job", timeout=400)
    scores = {row["index"]: row for row in map(json.loads, open(out))}
    dataset = SFTDataset(data_prefix)
    assert len(scores) == len(dataset.lengths)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64, experts_implementation="eager")
    for i in range(0, len(dataset.lengths), 150):
        tokens = torch.from_numpy(dataset.tokens(i))
        answer = torch.from_numpy(dataset.answer_mask(i).astype(bool))[1:]
        with torch.no_grad():
            logp = model(tokens[None, :-1]).logits[0].log_softmax(-1).gather(-1, tokens[1:, None])[:, 0]
        want = float(logp[answer].sum())
        assert scores[i]["num_answer_tokens"] == int(answer.sum()) > 0, i
        assert abs(scores[i]["logp_sum"] - want) <= 1e-5 * abs(want), (i, scores[i]["logp_sum"], want)
