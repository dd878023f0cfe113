"""The trainer end to end on CPU processes: co-located reference against the cache, step-0 weights, exact
resumption, a crash while saving, and config errors."""

import json
import os
import subprocess
import sys

import pytest

from minorsft_megatron.config import ConfigError, load_config
from minorsft_megatron.reference import CachedReference
from minorsft_megatron.reference_cache import ReferenceCacheError, write_cache
from tests.distributed import spawn
from tests.tokenizers_for_tests import REPO
from tests.train_workers import metrics, run_commands, tiny_config

@pytest.mark.parametrize("tp,pp,packing", [(2, 1, False), (1, 2, True)])
def test_colocated_reference_equals_cache_and_step_zero_weights_are_one(tmp_path, data_prefix, tp, pp, packing):
    """The reference scores two policy micro-batches as one (reference.micro_batch_size), padded or packed."""
    config = tiny_config(tmp_path, data_prefix, parallel={"tp": tp, "pp": pp}, data={"packing": packing},
                         reference={"micro_batch_size": 8})
    init, cache = str(tmp_path / "init"), str(tmp_path / "ref.jsonl")
    common = [f"checkpoint.init={init}", "train_steps=3"]
    spawn(2, run_commands, [
        ("init", [config, init]),
        ("score", ["--load", init, "--tp", str(tp), "--pp", str(pp), "--data", data_prefix, "--out", cache,
                   "--micro-batch-size", "5", "--per-token", f"{cache}.tokens"]),
        ("score", ["--load", init, "--tp", str(pp), "--pp", str(tp), "--data", data_prefix, "--out", f"{cache}.x"]),
        ("train", ["--config", config, *common, f"output_dir={tmp_path / 'colocated'}"]),
        ("train", ["--config", config, *common, f"output_dir={tmp_path / 'cache'}", "reference.mode=cache",
                   f"reference.cache={cache}"]),
    ], out_dir=tmp_path / "job", timeout=300)
    same = [json.loads(line) for line in open(cache)]  # scored again under the transposed layout
    other = [json.loads(line) for line in open(f"{cache}.x")]
    assert [r["index"] for r in same] == [r["index"] for r in other] == list(range(len(same)))
    assert [r["num_answer_tokens"] for r in same] == [r["num_answer_tokens"] for r in other]
    for a, b in zip(same, other):
        assert b["logp_sum"] == pytest.approx(a["logp_sum"], rel=1e-5)
    per_token = [json.loads(line) for line in open(f"{cache}.tokens")]  # --per-token: the same sums, token by token
    for a, t in zip(same, per_token):
        assert t["index"] == a["index"] and len(t["token_logp"]) == a["num_answer_tokens"]
        assert sum(t["token_logp"]) == pytest.approx(a["logp_sum"], rel=1e-5)
    colocated, cached = metrics(tmp_path / "colocated"), metrics(tmp_path / "cache")
    assert [r["iteration"] for r in colocated] == [1, 2, 3]
    first = colocated[0]
    assert first["weight_min"] == first["weight_max"] == 1.0 and first["m_theta"] == 0.0
    for a, b in zip(colocated, cached):
        for key in ("loss", "m_theta", "weight_mean", "grad_norm", "logp_per_token"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
    assert colocated[-1]["loss"] < colocated[0]["loss"] and colocated[-1]["m_theta"] > 0


def test_resume_continues_bitwise(tmp_path, data_prefix):
    config = tiny_config(tmp_path, data_prefix, parallel={"tp": 2}, logging={"tensorboard": True})
    straight, halves = f"output_dir={tmp_path / 'straight'}", f"output_dir={tmp_path / 'halves'}"
    spawn(2, run_commands, [
        ("train", ["--config", config, "train_steps=4", straight]),
        ("train", ["--config", config, "train_steps=4", "stop_at_step=2", halves]),
        ("train", ["--config", config, "train_steps=4", halves]),
    ], out_dir=tmp_path / "job", timeout=300)
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "halves")
    assert os.listdir(tmp_path / "straight" / "tensorboard")


def test_killed_while_saving_leaves_the_previous_checkpoint(tmp_path, data_prefix):
    config = tiny_config(tmp_path, data_prefix, parallel={"tp": 2}, checkpoint={"interval": 2})
    argv = ["--config", config, "train_steps=6"]
    with pytest.raises(AssertionError, match="exit codes"):
        spawn(2, run_commands, [("train", argv)], "iter_0000004", out_dir=tmp_path / "crash", timeout=300)
    saves = tmp_path / "run" / "checkpoints"
    assert (saves / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(os.listdir(saves)) == ["iter_0000002", "iter_0000004.tmp", "latest_checkpointed_iteration.txt"]
    crashed = metrics(tmp_path / "run")
    assert [r["iteration"] for r in crashed] == [1, 2, 3, 4]  # it logged 3 and 4, saved only 2
    spawn(2, run_commands, [("train", argv)], out_dir=tmp_path / "resume", timeout=300)
    rows = metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl continues without repeats
    assert rows[2:4] == crashed[2:4]  # resumed from iteration 2, the same steps again
    assert sorted(os.listdir(saves)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                         "latest_checkpointed_iteration.txt"]


def test_cache_of_another_dataset_or_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "ref.jsonl")
    meta = {"checkpoint": {"checkpoint_id": "abc", "path": "/ckpt/base", "iteration": 0},
            "dataset": {"fingerprint": "f" * 64, "prefix": "/data/a"}}
    write_cache(path, [0, 1], [-3.0, -4.0], [2, 3], meta)
    CachedReference(path, "f" * 64, "abc")
    with pytest.raises(ReferenceCacheError, match=r"computed on dataset ffffffffffff \(/data/a\), but this run "
                                                  r"trains on dataset 000000000000"):
        CachedReference(path, "0" * 64, "abc")
    with pytest.raises(ReferenceCacheError, match=r"checkpoint abc \(/ckpt/base\), but this run starts from xyz"):
        CachedReference(path, "f" * 64, "xyz")


@pytest.mark.parametrize("override,message", [
    ("model.hidden_sise=64", "model.hidden_sise: unknown key"),
    ("model.hidden_size=wide", "model.hidden_size: expected int, got str 'wide'"),
    ("optimizer.lr=[1]", "optimizer.lr: expected float, got list"),
    ("optimizer.lr=1e-5x", "optimizer.lr: expected float, got str '1e-5x'"),
    ("loss.name=dpo", "loss.name: 'dpo' is not one of"),
    ("parallel.tp=3", "parallel.tp: must divide the 2 query groups"),
    ("parallel.sp=true", "parallel.sp: needs parallel.tp > 1"),
    ("reference.mode=cache", "reference.cache: is required with reference.mode: cache"),
    ("reference.mode=none", "reference.mode: loss minor_sft needs a reference"),
    ("data.prefix=/nowhere/data", "data.prefix: /nowhere/data.json not found"),
    ("data.seq_length=4096", "data.seq_length: exceeds model.max_position_embeddings 128"),
    ("optimizer.decay=step", "optimizer.decay: 'step' is not one of linear, cosine"),
    ("trainsteps=3", "trainsteps: unknown key"),
])
def test_config_errors_name_file_and_key(tmp_path, data_prefix, override, message):
    config = tiny_config(tmp_path, data_prefix)
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    assert str(err.value).startswith(f"{config}: ") or str(err.value).startswith("command line")
    assert message in str(err.value)


def test_config_error_on_the_command_line_is_one_line(tmp_path, data_prefix):
    config = tmp_path / "bad.yaml"
    config.write_text(f"data:\n  prefix: {data_prefix}\nmodel:\n  num_layers: 2\n  colour: blue\n")
    proc = subprocess.run([sys.executable, "-m", "minorsft_megatron.train", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {config}: model.colour: unknown key (known: "
                                                + proc.stderr.split("(known: ")[1].strip()]
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("model:\n  num_layers: [2\n")
    with pytest.raises(ConfigError, match=rf"{bad_yaml}:3: not valid YAML"):
        load_config(str(bad_yaml))


def test_exponent_without_a_dot_is_a_float(tmp_path, data_prefix):
    """YAML 1.1 reads `1e-5` as a string; a float field takes it as the number it spells, in files and overrides."""
    config = tiny_config(tmp_path, data_prefix)
    assert load_config(config, ["optimizer.lr=1e-5", "loss.beta=4E-2"]).optimizer.lr == 1e-5
    assert load_config(config, ["loss.beta=4E-2"]).loss.beta == 0.04
    with pytest.raises(ConfigError, match="model.hidden_size: expected int, got str '1e2'"):
        load_config(config, ["model.hidden_size=1e2"])


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "qwen2_7b_minor_sft.yaml", "llama3_8b_minor_sft.yaml",
                                  "tiny_moe_cpu.yaml", "qwen3_30b_a3b_minor_sft.yaml", "tiny_lora_cpu.yaml"])
def test_example_configs_are_valid(data_prefix, name):
    """Every key of the bundled configs exists and has the right type (their data and checkpoints are replaced)."""
    overrides = [f"data.prefix={data_prefix}", "checkpoint.init=null"]
    config = load_config(os.path.join(REPO, "examples", name), overrides)
    assert config.loss.beta == 0.04 and config.optimizer.warmup_ratio == 0.1 and config.optimizer.decay == "linear"


def test_qwen3_moe_config_checks_its_layout(data_prefix):
    """One node of 8 GPUs at EP 8 forms the layout; 6 processes do not (one line, exit 2)."""
    run = lambda n: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "minorsft_megatron.config", "--config", os.path.join(REPO, "examples",
         "qwen3_30b_a3b_minor_sft.yaml"), "--world-size", str(n), f"data.prefix={data_prefix}", "checkpoint.init=null",
         "device=cpu"], capture_output=True, text=True, cwd=REPO)
    assert run(8).returncode == 0, run(8).stderr
    bad = run(12)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: " + os.path.join(REPO, "examples", "qwen3_30b_a3b_minor_sft.yaml") + ": parallel: world size 12 is "
        "not divisible by etp*ep*pp = 1*8*1 (the experts' grid)"]


def test_launchers(tmp_path, data_prefix):
    env = dict(os.environ, NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", GPUS_PER_NODE="8", DRY_RUN="1")
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "torchrun.sh"), "my.yaml", "optimizer.lr=1e-4"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == ["python", "-m", "minorsft_megatron.launch"]  # torchrun, with one line per error
    assert out[-4:] == ["minorsft_megatron.train", "--config", "my.yaml", "optimizer.lr=1e-4"]
    flags = dict(zip(out[3:-5:2], out[4:-5:2]))
    assert flags == {"--nnodes": "2", "--node-rank": "1", "--nproc-per-node": "8", "--master-addr": "node0",
                     "--master-port": "29500"}
    subprocess.run(["bash", "-n", os.path.join(REPO, "launch", "slurm.sbatch")], check=True)
    bad = subprocess.run(["bash", os.path.join(REPO, "launch", "torchrun.sh"), os.path.join(REPO, "examples",
                          "tiny_cpu.yaml"), "model.spec=te", "device=cpu", f"data.prefix={data_prefix}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: command line: model.spec: te (Transformer Engine) needs a GPU; use local or auto"]


@pytest.mark.parametrize("override,message", [
    ("precision.fp8=hybrid", "precision.fp8: 'hybrid' needs an NVIDIA GPU (compute capability >= 8.9)"),
    ("reference.precision=fp8", "reference FP8 needs an NVIDIA GPU"),
    ("reference.fp8_weights=true", "reference FP8 needs an NVIDIA GPU"),
    ("model.spec=te", "model.spec: te (Transformer Engine) needs a GPU"),
])
def test_what_a_cpu_cannot_run_is_refused_in_one_line(tmp_path, data_prefix, override, message):
    """FP8 and the Transformer Engine spec need a GPU; mixed precision and the distributed optimizer do not."""
    from minorsft_megatron.config import check_for_device

    for runs_on_cpu in (["precision.dtype=bf16", "optimizer.distributed=true"], ["precision.dtype=fp16"]):
        check_for_device(load_config(tiny_config(tmp_path, data_prefix), runs_on_cpu), "c.yaml", "cpu")
    config = load_config(tiny_config(tmp_path, data_prefix), [override])
    with pytest.raises(ConfigError) as err:
        check_for_device(config, "c.yaml", "cpu")
    assert str(err.value).startswith("c.yaml: ") and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv,message", [
    (["--load", "NOWHERE", "--data", "DATA", "--out", "OUT"],
     "error: NOWHERE: neither a checkpoint nor a directory with latest_checkpointed_iteration.txt"),
    (["--load", "CKPT", "--tp", "3", "--data", "DATA", "--out", "OUT"],
     "error: world size 1 is not divisible by tp*pp*cp = 3*1*1"),
])
def test_score_refuses_bad_input_in_one_line(tmp_path, data_prefix, argv, message):
    names = {"NOWHERE": str(tmp_path / "nowhere"), "DATA": data_prefix, "OUT": str(tmp_path / "out.jsonl"),
             "CKPT": str(tmp_path / "unread")}  # the layout is refused before the checkpoint is read
    proc = subprocess.run([sys.executable, "-m", "minorsft_megatron.score", *[names.get(a, a) for a in argv]],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message.replace("NOWHERE", names["NOWHERE"])]
    assert not (tmp_path / "out.jsonl").exists()


def test_slurm_script_off_a_gpu_cluster(tmp_path, data_prefix):
    """launch/slurm.sbatch outside Slurm's GPU assumptions, with `srun` stood in for: processes per node from what
    the job was given (none: one line), a rendezvous host that does not resolve (one line), a valid CPU config at
    2 nodes x 2 processes checked for 4 processes (not 16) and run with one OMP thread per process per CPU share."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\necho "srun $* OMP=$OMP_NUM_THREADS"\n')
    (fake / "srun").chmod(0o755)
    script, config = os.path.join(REPO, "launch", "slurm.sbatch"), os.path.join(REPO, "examples", "tiny_cpu.yaml")
    slurm = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_ID="7",
                 SLURM_CPUS_ON_NODE="4", MASTER_ADDR="localhost")
    slurm.pop("SLURM_GPUS_ON_NODE", None)

    def sbatch(*args, **env):
        return subprocess.run(["bash", script, config, "device=cpu", f"data.prefix={data_prefix}", *args],
                              env={**slurm, **env}, capture_output=True, text=True, cwd=REPO, timeout=120)

    none = sbatch()
    assert none.returncode == 2 and none.stderr.strip().splitlines() == [
        "error: the job has no GPUs on its nodes (SLURM_GPUS_ON_NODE unset): set NPROC_PER_NODE, the processes per "
        "node"] and none.stdout == ""
    unresolved = sbatch(NPROC_PER_NODE="2", MASTER_ADDR="n1.invalid")
    assert unresolved.returncode == 2 and unresolved.stderr.strip().splitlines() == [
        "error: the rendezvous host n1.invalid (the job's first node) does not resolve here: set MASTER_ADDR"]
    ran = sbatch(NPROC_PER_NODE="2")
    assert ran.returncode == 0, ran.stderr
    words = ran.stdout.split()
    assert words[words.index("--nnodes") + 1] == "2" and words[words.index("--nproc-per-node") + 1] == "2"
    assert words[words.index("--rdzv-endpoint") + 1] == "localhost:29500" and words[-1] == "OMP=2"
    bad = sbatch("data.global_batch_size=30", NPROC_PER_NODE="2")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
