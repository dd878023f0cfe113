"""bf16 and fp16 training through megatron-core's mixed-precision optimizers and its distributed optimizer, on CPU
processes over gloo: starting from a checkpoint, loss scaling, resuming (also under another data-parallel size
or tensor-parallel size), and converting what was trained back to Hugging Face.

Every run starts from the same random starting checkpoint; the fp32 run from it (plain optimizer, one process) is
the yardstick. bf16 tolerance: bf16 keeps 8 significant bits, so every weight, activation and logit of the bf16
forward is rounded by up to 2^-9 (0.2 %) relative; the optimizer's fp32 main weights keep the updates exact, so
the difference does not compound over 4 steps. Measured here: loss within 3e-4 relative and m_theta within
1.5e-3 absolute of fp32. The tolerances below (5e-3 both) are a few times that, and a hundred times below what
a lost starting checkpoint (NaN from step 2) or an unscaled fp16 loss (gradient norm 2^-10 too small) gives.
"""

import json
import os
import shutil

import pytest
import torch

from tests.distributed import spawn
from tests.train_workers import metrics, run_commands, tiny_config

BF16_RTOL_LOSS, BF16_ATOL_M_THETA = 5e-3, 5e-3
STEPS = 4


@pytest.fixture(scope="module")
def start(tmp_path_factory, data_prefix):
    """(config, starting checkpoint, the fp32 run's metrics from it)."""
    root = tmp_path_factory.mktemp("mixed")
    config = tiny_config(root, data_prefix, optimizer={"warmup_ratio": 0.25})
    init = str(root / "init")
    spawn(1, run_commands, [
        ("init", [config, init]),
        ("train", ["--config", config, f"checkpoint.init={init}", f"train_steps={STEPS}", f"output_dir={root / 'fp32'}"]),
    ], out_dir=root / "job", timeout=300)
    return config, init, metrics(root / "fp32")


def bf16_args(config, init, out, *extra):
    return ["--config", config, f"checkpoint.init={init}", f"train_steps={STEPS}", f"output_dir={out}",
            "precision.dtype=bf16", "reference.precision=bf16", "optimizer.distributed=true", *extra]


def assert_close_to(rows, expected, rtol_loss=BF16_RTOL_LOSS, atol_m_theta=BF16_ATOL_M_THETA):
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in expected]
    for got, want in zip(rows, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=rtol_loss), got["iteration"]
        assert got["m_theta"] == pytest.approx(want["m_theta"], abs=atol_m_theta), got["iteration"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2), got["iteration"]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_bf16_from_checkpoint_init_with_the_distributed_optimizer(tmp_path, start, tp, pp):
    """Step 1: policy == reference (both bf16, same weights, same micro-batch shapes), so every MinorSFT weight is
    exactly 1 and m_theta exactly 0; then 4 steps stay within bf16 tolerance of fp32 (the optimizer's fp32 main
    weights must hold the starting checkpoint, not the model's values before it was loaded)."""
    config, init, fp32 = start
    out = tmp_path / "bf16"
    spawn(2, run_commands, [("train", bf16_args(config, init, out, f"parallel.tp={tp}", f"parallel.pp={pp}"))],
          out_dir=tmp_path / "job", timeout=300)
    rows = metrics(out)
    assert rows[0]["weight_min"] == rows[0]["weight_max"] == 1.0 and rows[0]["m_theta"] == 0.0
    assert_close_to(rows, fp32)


def test_fp16_scales_the_loss_and_skips_overflowing_steps(tmp_path, start):
    """fp16 with megatron-core's dynamic loss scaler: the loss is scaled before backward (the gradient norm is
    fp32's, not 1/scale of it), the scale is logged, steps 3 and 4 made to overflow are skipped without moving
    the learning-rate schedule, and the second overflow in a row halves the scale (hysteresis 2)."""
    config, init, fp32 = start
    out = tmp_path / "fp16"
    args = ["--config", config, f"checkpoint.init={init}", "train_steps=6", f"output_dir={out}",
            "precision.dtype=fp16", "reference.precision=fp16", "precision.initial_loss_scale=1024"]
    spawn(2, run_commands, [("train", args)], None, {3, 4}, out_dir=tmp_path / "job", timeout=300)
    rows = metrics(out)
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, False]
    assert [r["loss_scale"] for r in rows] == [1024.0] * 4 + [512.0] * 2
    assert rows[2]["lr"] == rows[3]["lr"] == rows[4]["lr"] != rows[5]["lr"]  # the schedule waits for real steps
    assert rows[0]["weight_min"] == rows[0]["weight_max"] == 1.0 and rows[0]["m_theta"] == 0.0
    assert rows[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=2e-2)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_fp16_saves_and_resumes_before_the_first_real_step(tmp_path, start):
    """fp16 with the distributed optimizer, step 1 made to overflow (skipped): the step-1 checkpoint is saved before
    torch's Adam has any state (megatron-core's state_dict asserted on its missing `step`), and the run resumed from
    it goes on bit for bit with the straight run."""
    config, init, _ = start
    straight, halves = tmp_path / "straight", tmp_path / "halves"

    def args(out, *extra):
        return ["--config", config, f"checkpoint.init={init}", "train_steps=3", f"output_dir={out}",
                "precision.dtype=fp16", "reference.precision=fp16", "precision.initial_loss_scale=1024",
                "optimizer.distributed=true", *extra]

    spawn(2, run_commands, [("train", args(straight))], None, {1}, out_dir=tmp_path / "job", timeout=300)
    spawn(2, run_commands, [("train", args(halves, "stop_at_step=1"))], None, {1}, out_dir=tmp_path / "stop",
          timeout=300)
    assert os.path.isdir(halves / "checkpoints" / "iter_0000001")
    spawn(2, run_commands, [("train", args(halves))], out_dir=tmp_path / "resume", timeout=300)
    rows = metrics(straight)
    assert [r["skipped"] for r in rows] == [True, False, False]
    assert metrics(halves) == rows


def test_distributed_optimizer_resumes_bitwise_and_under_another_dp_size(tmp_path, start):
    """Stop at step 2 and resume: bit for bit at the same layout (DP = 2); from the same checkpoint in one
    process (DP = 1, dp_reshardable state resharded) within bf16 tolerance of the straight run."""
    config, init, _ = start
    straight, halves, dp1 = tmp_path / "straight", tmp_path / "halves", tmp_path / "dp1"
    spawn(2, run_commands, [
        ("train", bf16_args(config, init, straight)),
        ("train", bf16_args(config, init, halves, "stop_at_step=2")),
    ], out_dir=tmp_path / "job", timeout=300)
    shutil.copytree(halves / "checkpoints", dp1 / "checkpoints")
    spawn(2, run_commands, [("train", bf16_args(config, init, halves))], out_dir=tmp_path / "resume", timeout=300)
    spawn(1, run_commands, [("train", bf16_args(config, init, dp1))], out_dir=tmp_path / "dp1job", timeout=300)
    assert metrics(halves) == metrics(straight)
    resumed = metrics(dp1)
    assert [r["iteration"] for r in resumed] == [3, 4]
    assert_close_to(resumed, metrics(straight)[2:], rtol_loss=1e-3, atol_m_theta=2e-3)


def test_fully_reshardable_state_resumes_under_another_tensor_parallel_size(tmp_path, start):
    """checkpoint.optimizer_sharding: fully_reshardable, saved at TP = 1 x DP = 2, resumed at TP = 2 x DP = 1."""
    config, init, _ = start
    sharding = "checkpoint.optimizer_sharding=fully_reshardable"
    straight, run = tmp_path / "straight", tmp_path / "run"
    spawn(2, run_commands, [
        ("train", bf16_args(config, init, straight, sharding)),
        ("train", bf16_args(config, init, run, sharding, "stop_at_step=2")),
        ("train", bf16_args(config, init, run, sharding, "parallel.tp=2")),
    ], out_dir=tmp_path / "job", timeout=300)
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert_close_to(rows[2:], metrics(straight)[2:], rtol_loss=1e-3, atol_m_theta=2e-3)


def test_resume_refuses_an_optimizer_state_it_cannot_load(tmp_path):
    from minorsft_megatron.checkpoint import CheckpointError
    from minorsft_megatron.config import TrainConfig
    from minorsft_megatron.train import check_resumed_optimizer

    cfg = TrainConfig()
    cfg.optimizer.distributed, cfg.parallel.tp = True, 2
    saved = {"optimizer_sharding": "dp_reshardable", "layout": {"tp": 1, "pp": 1, "cp": 1, "world": 2}}
    with pytest.raises(CheckpointError, match=r"^CKPT: its distributed-optimizer state \(dp_reshardable\) was "
                                              r"saved at tp=1 pp=1 cp=1 ep=1 etp=1 and loads only there \(this run: tp=2 "):
        check_resumed_optimizer(cfg, saved, "CKPT")
    with pytest.raises(CheckpointError, match="^CKPT: was saved with optimizer.distributed False, this run has True"):
        check_resumed_optimizer(cfg, dict(saved, optimizer_sharding=None), "CKPT")
    check_resumed_optimizer(cfg, dict(saved, optimizer_sharding="fully_reshardable"), "CKPT")


def convert_and_read_back(runs: dict) -> dict:
    """For each (hf directory, checkpoint) of `runs`: megatron-to-hf, and the checkpoint's tensors loaded by
    megatron-core at TP = PP = 1 under their Hugging Face names."""
    from minorsft_megatron import checkpoint, parallel
    from minorsft_megatron.config import ParallelConfig, TrainConfig, from_dict
    from minorsft_megatron.convert import hf_from_megatron, hf_names, megatron_to_hf
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.model import build_model, unwrap
    from minorsft_megatron.transformer_engine import RolePrecision

    device = setup_device("cpu")
    parallel.initialize(device)
    expected = {}
    for hf, ckpt in runs.items():
        megatron_to_hf(ckpt, hf, log=lambda *_: None)
        state = checkpoint.read_state(ckpt)
        cfg = from_dict(TrainConfig, state["config"], ckpt)
        cfg.parallel = ParallelConfig()
        model, _ = build_model(cfg, RolePrecision(cfg.precision.dtype), state["vocab_size"], device, initialize=False)
        checkpoint.load(ckpt, model)
        tensors, m = unwrap(model).state_dict(), cfg.model
        m.vocab_size = state["vocab_size"]
        expected[hf] = {name: hf_from_megatron(name, tensors.__getitem__, m).clone() for name in hf_names(m)}
    return expected


def test_megatron_to_hf_of_checkpoints_trained_under_pp_tp_sp_and_the_distributed_optimizer(tmp_path, start):
    from safetensors import safe_open

    config, init, _ = start
    layouts = {"pp2": ["parallel.pp=2"], "tp2sp": ["parallel.tp=2", "parallel.sp=true"], "dp2": []}
    spawn(2, run_commands, [
        ("train", bf16_args(config, init, tmp_path / name, "train_steps=1", *extra)) for name, extra in layouts.items()
    ], out_dir=tmp_path / "job", timeout=300)
    runs = {str(tmp_path / name / "hf"): str(tmp_path / name / "checkpoints") for name in layouts}
    expected = spawn(1, convert_and_read_back, runs, out_dir=tmp_path / "convert")[0]
    for hf, tensors in expected.items():
        with safe_open(os.path.join(hf, "model.safetensors"), "pt") as f:
            assert sorted(f.keys()) == sorted(tensors)
            for key, tensor in tensors.items():
                assert tensor.dtype == torch.bfloat16 and torch.equal(f.get_tensor(key), tensor), (hf, key)
        assert json.load(open(os.path.join(hf, "config.json")))["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("distributed", [False, True], ids=["ddp", "distributed-optimizer"])
def test_overlapped_gradient_reduce_gives_the_same_steps(tmp_path, start, distributed):
    """parallel.overlap_grad_reduce (on by default on GPUs) reduces each bucket during the last micro-batch's
    backward instead of after it: at DP = 2 with 2 micro-batches per rank the losses, gradient norms and weights
    are bit for bit those of the reduce after backward, in bf16 with and without the distributed optimizer."""
    config, init, _ = start
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap_{overlap}"
        args = bf16_args(config, init, out, f"parallel.overlap_grad_reduce={str(overlap).lower()}",
                         "data.micro_batch_size=2", f"optimizer.distributed={str(distributed).lower()}")
        spawn(2, run_commands, [("train", args)], out_dir=tmp_path / f"job_{overlap}", timeout=300)
        runs[overlap] = metrics(out)
    assert len(runs[True]) == STEPS and runs[True] == runs[False]


def test_overlapped_parameter_gather_gives_the_same_steps_and_checkpoints(tmp_path, start):
    """parallel.overlap_param_gather (distributed optimizer, on by default on GPUs) gathers the updated parameters
    during the next forward: 4 steps, and 2 steps saved then resumed for 2 more (the save must gather first, or
    the checkpoint holds other ranks' stale shards), are bit for bit the steps without it."""
    config, init, _ = start
    runs = {}
    for overlap in (False, True):
        flags = [f"parallel.overlap_grad_reduce={str(overlap).lower()}",
                 f"parallel.overlap_param_gather={str(overlap).lower()}", "data.micro_batch_size=2"]
        straight, halves = tmp_path / f"straight_{overlap}", tmp_path / f"halves_{overlap}"
        spawn(2, run_commands, [("train", bf16_args(config, init, straight, *flags)),
                                ("train", bf16_args(config, init, halves, *flags, "stop_at_step=2")),
                                ("train", bf16_args(config, init, halves, *flags))],
              out_dir=tmp_path / f"job_{overlap}", timeout=300)
        runs[overlap] = metrics(straight)
        assert [r["iteration"] for r in metrics(halves)] == [1, 2, 3, 4]
        assert metrics(halves) == runs[overlap]
    assert len(runs[True]) == STEPS and runs[True] == runs[False]
