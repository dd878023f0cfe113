"""What careless and hostile uses of the tools get: each case of issue 17, run as the user would run it.

Every refusal is one line on stderr, `error: ...`, naming the path, key or record, with a non-zero exit and
nothing written or half-written; where the intent is clear and safe the tool does it right instead. Commands run
in fresh processes (forked from the test fork server) with their stderr captured at the file-descriptor level,
so a traceback anywhere would show.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from minorsft_megatron.paths import DirectoryLock
from tests.distributed import spawn
from tests.tokenizers_for_tests import DATA, REPO, SENTENCEPIECE_MODEL
from tests.train_workers import metrics, tiny_config

READ_ONLY = "/sys/minorsft-test"  # not writable even for root


def _command(module: str, argv: list[str], stderr_dir: str, faults: dict) -> int:
    """`python -m module argv` in this process; fd 2 goes to a file per rank. `faults` injects failures."""
    import importlib

    rank = os.environ["RANK"]
    fd = os.open(os.path.join(stderr_dir, f"stderr{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    for name, arg in faults.items():
        FAULTS[name](arg)
    try:
        return importlib.import_module(module).main(argv)
    finally:
        sys.stderr.flush()


def run(tmp_path, module: str, *argv, world: int = 1, **faults) -> tuple[int, list[str]]:
    """Exit status and stderr lines of rank 0 (rank 0 reports errors)."""
    job = tmp_path / f"cmd{len(list(tmp_path.glob('cmd*')))}"
    job.mkdir()
    codes = spawn(world, _command, module, [str(a) for a in argv], str(job), faults, out_dir=job, timeout=300)
    lines = (job / "stderr0").read_text().splitlines()
    return codes[0], [line for line in lines if line.strip()]


def one_error(result, *fragments) -> str:
    code, lines = result
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- fault injection (the hazardous cases, made safe) --------------------------------------------------------------

def _disk_full_on_save(at_save: int):
    """Every rank's dist-checkpoint save number `at_save` fails as a full disk does."""
    from megatron.core import dist_checkpointing

    real, count = dist_checkpointing.save, [0]

    def save(*args, **kwargs):
        count[0] += 1
        if count[0] == at_save:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    dist_checkpointing.save = save


def _peer_lost_on_save(at_save: int):
    """Every rank's dist-checkpoint save number `at_save` fails as gloo does when another rank died meanwhile."""
    from megatron.core import dist_checkpointing

    real, count = dist_checkpointing.save, [0]

    def save(*args, **kwargs):
        count[0] += 1
        if count[0] == at_save:
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                               "[127.0.0.1]:29328. This is typically caused by a remote worker crashing")
        return real(*args, **kwargs)

    dist_checkpointing.save = save


def _disk_full_after_records(records: int):
    """Preprocessing's writers fail as a full disk does after `records` samples."""
    from minorsft_megatron.data import preprocess

    real, count = preprocess._Writers.add, [0]

    def add(self, ids, mask):
        count[0] += 1
        if count[0] > records:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, ids, mask)

    preprocess._Writers.add = add


FAULTS = {"disk_full_on_save": _disk_full_on_save, "disk_full_after_records": _disk_full_after_records,
          "peer_lost_on_save": _peer_lost_on_save}


# ---- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_prefix):
    """A config, a starting checkpoint, and a run of 4 steps from it (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("bad")
    config = tiny_config(root, data_prefix, checkpoint={"interval": 2})
    init, run_dir = root / "init", root / "run"
    assert run(root, "minorsft_megatron.init_checkpoint", "--config", config, "--out", init)[0] == 0
    assert run(root, "minorsft_megatron.train", "--config", config, f"checkpoint.init={init}", "train_steps=4",
               f"output_dir={run_dir}", world=2)[0] == 0
    return config, init, run_dir


def train(tmp_path, config, *overrides, world=2, **faults):
    return run(tmp_path, "minorsft_megatron.train", "--config", config, *overrides, world=world, **faults)


def snapshot(path) -> dict:
    """Every file under `path` with its modification time (directories are probed for writability, files never)."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file()}


# ---- data loss and silently wrong results ------------------------------------------------------------------------

def test_megatron_to_hf_never_replaces_what_it_did_not_make(tmp_path, trained):
    config, init, run_dir = trained
    before = snapshot(run_dir)
    one_error(run(tmp_path, "minorsft_megatron.convert", "megatron-to-hf", "--load", init, "--out", run_dir),
              f"--out {run_dir}: not empty", "--overwrite")
    one_error(run(tmp_path, "minorsft_megatron.convert", "megatron-to-hf", "--load", init, "--out", init,
                  "--overwrite"), f"--out {init} is (or holds) --load")
    assert snapshot(run_dir) == before and (init / "latest_checkpointed_iteration.txt").is_file()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "notes.txt").write_text("mine")
    one_error(run(tmp_path, "minorsft_megatron.convert", "megatron-to-hf", "--load", init, "--out", hf), "not empty")
    assert (hf / "notes.txt").read_text() == "mine"
    assert run(tmp_path, "minorsft_megatron.convert", "megatron-to-hf", "--load", init, "--out", hf,
               "--overwrite")[0] == 0  # asked for: replaced
    assert (hf / "model.safetensors").is_file() and not (hf / "notes.txt").exists()


def test_outputs_never_replace_inputs(tmp_path, trained, data_prefix):
    config, init, _ = trained
    data = tmp_path / "d"
    data.mkdir()
    records = data / "train.json"
    shutil.copy(f"{DATA}/sft_eval.jsonl", records)
    before = records.read_bytes()
    one_error(run(tmp_path, "minorsft_megatron.data.preprocess", "--input", records, "--tokenizer",
                  SENTENCEPIECE_MODEL, "--output-prefix", data / "train"), f"is (or holds) --input {records}")
    assert records.read_bytes() == before
    jsonl = tmp_path / "eval.jsonl"
    shutil.copy(f"{DATA}/sft_eval.jsonl", jsonl)
    common = ["--load", init, "--jsonl", jsonl, "--tokenizer", SENTENCEPIECE_MODEL]
    one_error(run(tmp_path, "minorsft_megatron.score", *common, "--out", jsonl), f"--out {jsonl} is (or holds) --jsonl")
    one_error(run(tmp_path, "minorsft_megatron.generate", *common, "--out", jsonl), "--out", "--jsonl")
    base = tmp_path / "base.jsonl"
    assert run(tmp_path, "minorsft_megatron.score", "--load", init, "--data", data_prefix, "--out", base)[0] == 0
    cache = base.read_bytes()
    one_error(run(tmp_path, "minorsft_megatron.score", "--load", init, "--data", data_prefix, "--out", base,
                  "--reference", base), "--out", "--reference")
    assert base.read_bytes() == cache
    out = tmp_path / "scores.jsonl"
    one_error(run(tmp_path, "minorsft_megatron.score", "--load", init, "--data", data_prefix, "--out", out,
                  "--per-token", out), "--out and --per-token are the same file")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, trained):
    config = trained[0]
    run_dir = tmp_path / "nan"
    line = one_error(train(tmp_path, config, "optimizer.lr=1e30", "checkpoint.interval=1", "checkpoint.keep=1",
                           "train_steps=6", f"output_dir={run_dir}"),
                     "iteration 2: the loss or the gradient norm is not finite; stopped without saving")
    saves = run_dir / "checkpoints"
    assert f"The last complete checkpoint is {saves}/iter_0000001" in line
    assert sorted(os.listdir(saves)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("override,message", [
    ("loss.beta=1e400", "command line: loss.beta: must be a finite number, got inf"),
    ("optimizer.lr=1e400", "command line: optimizer.lr: must be a finite number, got inf"),
    ("optimizer.lr=.inf", "command line: optimizer.lr: must be a finite number, got inf"),
    ("model.rotary_base=0", "command line: model.rotary_base: must be positive"),
    ("optimizer.adam_eps=-1", "command line: optimizer.adam_eps: must be positive"),
    ("optimizer.adam_beta1=2", "command line: optimizer.adam_beta1: must be in [0, 1)"),
    ("output_dir=", "command line: output_dir: is required"),
    ("device=cuda", "device: cuda was asked for, but no CUDA device is visible"),
    ("data.global_batch_size=6", "command line: data.global_batch_size: 6 is not a multiple of data.micro_batch_size x "
                                 "the data-parallel size (8, 2 processes)"),
    ("optimizer.lr=abc", "command line: optimizer.lr: expected float, got str 'abc'"),
])
def test_settings_out_of_range_are_refused_before_any_work(tmp_path, trained, override, message):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    one_error(train(tmp_path, trained[0], f"output_dir={tmp_path / 'run'}", override), message)  # the case last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_config_file_names_itself_for_its_own_keys(tmp_path, data_prefix):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{prefix: {data_prefix}}}\noptimizer: {{lr: .inf}}\ndevice: cpu\n")
    one_error(train(tmp_path, config), f"{config}: optimizer.lr: must be a finite number, got inf")
    config.write_text(f"data: {{prefix: {data_prefix}, global_batch_size: 6, micro_batch_size: 4}}\ndevice: cpu\n")
    one_error(train(tmp_path, config), f"{config}: data.global_batch_size: 6 is not a multiple")


def test_output_dir_and_save_dir_that_cannot_be_written_are_refused_before_any_step(tmp_path, trained):
    config = trained[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_error(train(tmp_path, config, f"output_dir={a_file}"), f"output_dir: {a_file} is a file")
    one_error(train(tmp_path, config, f"output_dir={tmp_path / 'r1'}", f"checkpoint.save={a_file}"),
              f"checkpoint.save: {a_file} is a file")
    one_error(train(tmp_path, config, f"output_dir={tmp_path / 'r2'}", f"checkpoint.save={READ_ONLY}/ck"),
              f"checkpoint.save {READ_ONLY}/ck: /sys is not writable")
    one_error(train(tmp_path, config, f"output_dir={READ_ONLY}"), "output_dir", "/sys is not writable")
    assert not (tmp_path / "r2" / "metrics.jsonl").exists()


def test_a_reference_cache_holding_nan_is_refused(tmp_path, trained, data_prefix):
    config, init, _ = trained
    cache = tmp_path / "ref.jsonl"
    assert run(tmp_path, "minorsft_megatron.score", "--load", init, "--data", data_prefix, "--out", cache)[0] == 0
    rows = cache.read_text().splitlines()
    rows[3] = json.dumps(dict(json.loads(rows[3]), logp_sum=float("nan")))
    cache.write_text("\n".join(rows) + "\n")
    one_error(train(tmp_path, config, f"checkpoint.init={init}", "reference.mode=cache", f"reference.cache={cache}",
                    f"output_dir={tmp_path / 'run'}"), f"{cache}:4: logp_sum is nan, not a finite number")


def test_score_refuses_to_write_non_finite_log_probs(tmp_path):
    import numpy as np

    from minorsft_megatron.errors import UserError
    from minorsft_megatron.score import ScoredPart, write_result

    class Args:
        load, out, per_token, reference, data, jsonl, tp, pp, cp = "CKPT", str(tmp_path / "o.jsonl"), None, None, \
            "d", None, 1, 1, 1

    class Dataset:
        prefix, fingerprint = "d", "f" * 64

        def __len__(self):
            return 3

    part = ScoredPart([0, 1, 2], [-1.0, float(np.nan), -2.0], [1, 1, 1])
    with pytest.raises(UserError, match=r"^CKPT: 1 of 3 samples get a non-finite log-prob \(first: sample 1\)"):
        write_result(Args, [part], Dataset(), {"checkpoint_id": "x", "iteration": 0}, "fp32")
    assert not os.path.exists(Args.out)


def test_a_resume_with_another_schedule_or_loss_is_refused_unless_asked(tmp_path, trained):
    config, init, run_dir = trained
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    os.remove(work / ".minorsft.lock")
    base = [f"checkpoint.init={init}", f"output_dir={work}"]
    one_error(train(tmp_path, config, *base, "train_steps=8", "optimizer.lr=5e-2"),
              "resuming with another learning-rate schedule: optimizer.lr 0.05 (checkpoint 0.002), train_steps 8 "
              "(checkpoint 4); set checkpoint.override_schedule: true")
    one_error(train(tmp_path, config, *base, "train_steps=4", "loss.name=sft"),
              "resuming with other settings: loss.name sft (checkpoint minor_sft)")
    one_error(train(tmp_path, config, *base, "train_steps=4", "data.global_batch_size=16"),
              "data.global_batch_size 16 (checkpoint 8)")
    assert train(tmp_path, config, *base, "train_steps=8", "optimizer.lr=5e-2", "checkpoint.override_schedule=true")[0] == 0
    rows = metrics(work)
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert rows[4]["lr"] == pytest.approx(5e-2 * (1 - 4 / 8))  # the new schedule at step 5, not lr 0


def test_a_deleted_tracker_is_refused_not_restarted(tmp_path, trained):
    config, init, run_dir = trained
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    os.remove(work / ".minorsft.lock")
    os.remove(work / "checkpoints" / "latest_checkpointed_iteration.txt")
    before = snapshot(work)
    one_error(train(tmp_path, config, f"checkpoint.init={init}", "train_steps=4", f"output_dir={work}"),
              "holds iter_0000002, iter_0000004 but no latest_checkpointed_iteration.txt")
    assert snapshot(work) == before


def test_init_checkpoint_never_rewinds_a_run_and_a_starting_checkpoint_is_not_resumed(tmp_path, trained):
    config, init, run_dir = trained
    saves = run_dir / "checkpoints"
    one_error(run(tmp_path, "minorsft_megatron.init_checkpoint", "--config", config, "--out", saves),
              f"--out {saves}: not empty")
    assert (saves / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    one_error(train(tmp_path, config, f"checkpoint.load={init}", f"output_dir={tmp_path / 'r'}"),
              f"{init}: a starting checkpoint (init_checkpoint or hf-to-megatron), not a training run's")


def test_a_checkpoint_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(tmp_path, trained, data_prefix):
    config = trained[0]
    small = tmp_path / "small"
    assert run(tmp_path, "minorsft_megatron.init_checkpoint", "--config", config, "--out", small,
               "model.vocab_size=500")[0] == 0
    one_error(run(tmp_path, "minorsft_megatron.score", "--load", small, "--data", data_prefix, "--out",
                  tmp_path / "s.jsonl"), "its tokenizer has 1024 tokens, more than the checkpoint")
    one_error(run(tmp_path, "minorsft_megatron.generate", "--load", small, "--jsonl", f"{DATA}/sft_eval.jsonl",
                  "--tokenizer", SENTENCEPIECE_MODEL, "--out", tmp_path / "g.jsonl"),
              "has 1024 tokens, more than the checkpoint")
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "g.jsonl").exists()


def test_megatron_to_hf_of_a_run_without_model_vocab_size_writes_the_tokenizers(tmp_path, trained):
    init = trained[1]
    hf = tmp_path / "hf"
    code, lines = run(tmp_path, "minorsft_megatron.convert", "megatron-to-hf", "--load", init, "--out", hf, "--verify")
    assert code == 0, lines
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 1024


def test_duplicate_keys_in_a_record_are_refused(tmp_path):
    records = tmp_path / "dup.jsonl"
    records.write_text('{"prompt": "What is 1 plus 1?", "response": "2.", "response": "3."}\n')
    one_error(run(tmp_path, "minorsft_megatron.data.preprocess", "--input", records, "--tokenizer",
                  SENTENCEPIECE_MODEL, "--output-prefix", tmp_path / "out"),
              f"{records}:1: the key 'response' appears twice in one object")


def test_a_run_directory_is_locked_while_a_run_uses_it(tmp_path, trained):
    run_dir = tmp_path / "busy"
    lock = DirectoryLock(str(run_dir), "output_dir")
    try:
        one_error(train(tmp_path, trained[0], f"output_dir={run_dir}"),
                  f"output_dir {run_dir} is in use by another run (pid {os.getpid()})")
    finally:
        lock.release()
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_fresh_run_never_truncates_an_earlier_runs_metrics(tmp_path, trained):
    run_dir = tmp_path / "earlier"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    one_error(train(tmp_path, trained[0], f"output_dir={run_dir}"), "holds an earlier run's metrics.jsonl")
    assert (run_dir / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


# ---- hangs and leaked resources ----------------------------------------------------------------------------------

def test_absurd_worker_counts_are_refused_before_any_fork(tmp_path):
    one_error(run(tmp_path, "minorsft_megatron.data.preprocess", "--input", f"{DATA}/sft_eval.jsonl", "--tokenizer",
                  SENTENCEPIECE_MODEL, "--output-prefix", tmp_path / "out", "--workers", "100000"),
              f"--workers 100000: at most {4 * os.cpu_count()} on this machine")
    assert list(tmp_path.glob("out*")) == []


def _ranks_of(launcher_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split()
    pairs = list(zip(map(int, out[2::2]), map(int, out[3::2])))
    return [pid for pid, ppid in pairs if ppid == launcher_pid]


def test_ranks_die_with_their_launcher(tmp_path, trained):
    """SIGKILL of the torchrun agent: the ranks end too (parent-death signal), instead of training on."""
    launcher = subprocess.Popen([sys.executable, "-m", "minorsft_megatron.launch", "--nproc-per-node", "2", "-m",
                                 "minorsft_megatron.train", "--config", trained[0], f"output_dir={tmp_path / 'r'}",
                                 "logging.interval=1000"], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    ranks = _ranks_of(launcher.pid)
    assert len(ranks) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
              for pid in ranks) and time.time() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in ranks if os.path.exists(f"/proc/{pid}") and
             open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    assert not alive, alive


def test_ctrl_c_is_one_line(tmp_path, trained):
    launcher = subprocess.Popen([sys.executable, "-m", "minorsft_megatron.launch", "--nproc-per-node", "2", "-m",
                                 "minorsft_megatron.train", "--config", trained[0], f"output_dir={tmp_path / 'r'}",
                                 "logging.interval=1000"], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, stderr = launcher.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert launcher.returncode == 130 and lines == ["error: interrupted"], (launcher.returncode, lines)


# ---- tracebacks turned into one line -----------------------------------------------------------------------------

def test_preprocess_refuses_bad_text_damaged_tokenizers_and_unwritable_places(tmp_path):
    records = tmp_path / "s.jsonl"
    records.write_text('{"prompt": "hi \\ud800 there", "response": "ok."}\n{"prompt": "a", "response": "b."}\n')
    common = ["--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix", tmp_path / "out"]
    one_error(run(tmp_path, "minorsft_megatron.data.preprocess", "--input", records, *common),
              f"{records}:1: 'prompt' is not valid Unicode (a lone surrogate, '\\ud800', at character 3)")
    code, lines = run(tmp_path, "minorsft_megatron.data.preprocess", "--input", records, *common, "--skip-bad-records")
    assert code == 0 and json.loads((tmp_path / "out.json").read_text())["counts"]["bad_records"] == 1
    truncated = tmp_path / "t.model"
    truncated.write_bytes(open(SENTENCEPIECE_MODEL, "rb").read()[:500])
    one_error(run(tmp_path, "minorsft_megatron.data.preprocess", "--input", records, "--tokenizer", truncated,
                  "--output-prefix", tmp_path / "o2"), f"{truncated}: cannot load the SentencePiece model")
    one_error(run(tmp_path, "minorsft_megatron.data.preprocess", "--input", records, "--tokenizer",
                  SENTENCEPIECE_MODEL, "--output-prefix", f"{READ_ONLY}/out"), "/sys is not writable")


def test_preprocess_on_a_full_disk_leaves_nothing(tmp_path):
    out = tmp_path / "data" / "train"
    one_error(run(tmp_path, "minorsft_megatron.data.preprocess", "--input", f"{DATA}/sft_train.jsonl", "--tokenizer",
                  SENTENCEPIECE_MODEL, "--output-prefix", out, disk_full_after_records=50),
              "No space left on device; nothing was written")
    assert list((tmp_path / "data").iterdir()) == []  # the directory was made (missing); nothing is in it


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, trained):
    config, init = trained[0], trained[1]
    run_dir = tmp_path / "full"
    line = one_error(train(tmp_path, config, f"checkpoint.init={init}", "train_steps=4", f"output_dir={run_dir}",
                           disk_full_on_save=2),
                     "saving iteration 4 failed (OSError: [Errno 28] No space left on device)")
    saves = run_dir / "checkpoints"
    assert f"{saves}/iter_0000002 stays the latest complete checkpoint" in line
    assert sorted(os.listdir(saves)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_a_rank_lost_while_saving_is_the_lost_peer_line(tmp_path, trained):
    """A save that fails because another rank died (seen in the two-node Slurm job: the survivor was saving) is
    the lost-peer line and its exit status, not a failed save's; the previous checkpoint stays."""
    config, init = trained[0], trained[1]
    run_dir = tmp_path / "lost"
    code, lines = train(tmp_path, config, f"checkpoint.init={init}", "train_steps=4", f"output_dir={run_dir}",
                        peer_lost_on_save=2)
    assert code == 3 and lines == ["error: rank 0 lost another rank of the job (Connection closed by peer "
                                   "[127.0.0.1]:29328): a process or node died; the first failure in the job's logs "
                                   "says why"], (code, lines)
    saves = run_dir / "checkpoints"
    assert sorted(os.listdir(saves)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("damage", ["truncate the common state", "remove the common state", "remove .metadata",
                                    "truncate a shard"])
def test_a_damaged_checkpoint_is_one_line(tmp_path, trained, data_prefix, damage):
    ckpt = tmp_path / "ck"
    shutil.copytree(trained[2] / "checkpoints" / "iter_0000004", ckpt)
    common = ckpt / "common.pt" if (ckpt / "common.pt").exists() else ckpt / ".metadata"  # megatron-core 0.19: there
    target = {"truncate the common state": common, "remove the common state": common,
              "remove .metadata": ckpt / ".metadata", "truncate a shard": sorted(ckpt.glob("*.distcp"))[0]}[damage]
    if damage.startswith("remove"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:200])
    one_error(run(tmp_path, "minorsft_megatron.score", "--load", ckpt, "--data", data_prefix, "--out",
                  tmp_path / "s.jsonl"), f"{ckpt}: cannot be read, the checkpoint is damaged or incomplete")
    one_error(train(tmp_path, trained[0], f"checkpoint.load={ckpt}", f"checkpoint.init={trained[1]}",
                    "train_steps=4", f"output_dir={tmp_path / 'r'}"), f"{ckpt}: cannot be read")


def test_score_arguments_paths_and_mismatches_are_one_line(tmp_path, trained, data_prefix):
    init = trained[1]
    one_error(run(tmp_path, "minorsft_megatron.score", "--load", init, "--data", data_prefix, "--out",
                  tmp_path / "s.jsonl", "--micro-batch-size", "0"), "--micro-batch-size: must be at least 1, got 0")
    nested = tmp_path / "new" / "dir" / "s.jsonl"
    assert run(tmp_path, "minorsft_megatron.score", "--load", init, "--data", data_prefix, "--out", nested)[0] == 0
    assert nested.is_file()  # a missing directory for an output is made
    code, lines = run(tmp_path, "minorsft_megatron.score", "--load", init, "--jsonl", f"{DATA}/sft_eval.jsonl",
                      "--tokenizer", tmp_path / "no_tokenizer.model", "--out", tmp_path / "t.jsonl", world=2)
    one_error((code, lines), "no_tokenizer.model: no such file")  # rank 1 waits for no one: one line, no traceback
    other = tmp_path / "other.jsonl"
    assert run(tmp_path, "minorsft_megatron.score", "--load", init, "--jsonl", f"{DATA}/sft_eval.jsonl",
               "--tokenizer", SENTENCEPIECE_MODEL, "--out", other)[0] == 0
    one_error(run(tmp_path, "minorsft_megatron.score", "--load", init, "--data", data_prefix, "--out",
                  tmp_path / "m.jsonl", "--reference", other), f"--reference {other}: scored on another dataset")
    assert not (tmp_path / "m.jsonl").exists()


def test_generate_init_and_convert_outputs_are_checked_first(tmp_path, trained):
    config, init = trained[0], trained[1]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    gen = ["--load", init, "--jsonl", f"{DATA}/sft_eval.jsonl", "--tokenizer", SENTENCEPIECE_MODEL]
    one_error(run(tmp_path, "minorsft_megatron.generate", *gen, "--out", f"{READ_ONLY}/g.jsonl"), "/sys is not writable")
    one_error(run(tmp_path, "minorsft_megatron.generate", *gen, "--out", tmp_path), f"--out {tmp_path}: is a directory")
    one_error(run(tmp_path, "minorsft_megatron.generate", *gen, "--out", tmp_path / "g.jsonl", "--max-new-tokens", "500"),
              "--max-new-tokens 500: the longest prompt", "max_position_embeddings")
    one_error(run(tmp_path, "minorsft_megatron.init_checkpoint", "--config", config, "--out", a_file), "is a file")
    one_error(run(tmp_path, "minorsft_megatron.init_checkpoint", "--config", config, "--out", f"{READ_ONLY}/i"),
              "/sys is not writable")
    assert run(tmp_path, "minorsft_megatron.init_checkpoint", "--config", config, "--out", tmp_path / "a" / "b")[0] == 0
    one_error(run(tmp_path, "minorsft_megatron.convert", "megatron-to-hf", "--load", init, "--out", a_file),
              f"--out {a_file}: is a file")
    assert a_file.read_text() == "x" and not list(tmp_path.glob("a_file.tmp*"))


def test_damaged_hugging_face_inputs_are_one_line_and_leave_no_output(tmp_path):
    from tests.convert_workers import make_hf_model

    hf = tmp_path / "hf"
    make_hf_model("llama", str(hf))
    weights = (hf / "model.safetensors").read_bytes()
    out = tmp_path / "mg"
    (hf / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    one_error(run(tmp_path, "minorsft_megatron.convert", "hf-to-megatron", "--hf-dir", hf, "--out", out),
              f"{hf}/model.safetensors: cannot be read, the file is damaged or incomplete")
    assert not out.exists() and not list(tmp_path.glob("mg.tmp*"))
    (hf / "model.safetensors").write_bytes(weights)
    (hf / "config.json").write_text("{not json")
    one_error(run(tmp_path, "minorsft_megatron.convert", "hf-to-megatron", "--hf-dir", hf, "--out", out),
              f"{hf}/config.json: not valid JSON")
    assert not out.exists()


def test_a_damaged_shard_fails_megatron_to_hf_in_one_line(tmp_path, trained):
    ckpt = tmp_path / "ck"
    shutil.copytree(trained[2] / "checkpoints" / "iter_0000004", ckpt)
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    one_error(run(tmp_path, "minorsft_megatron.convert", "megatron-to-hf", "--load", ckpt, "--out", tmp_path / "hf"),
              f"{ckpt}: cannot be read, the ", "damaged or incomplete")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp*"))


# ---- unclear messages and leftovers ----------------------------------------------------------------------------------

def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path, trained, data_prefix):
    out = tmp_path / "s.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"s.jsonl.tmp{dead}"
    stale.write_text("half")
    assert run(tmp_path, "minorsft_megatron.score", "--load", trained[1], "--data", data_prefix, "--out", out)[0] == 0
    assert not stale.exists()


def test_the_readmes_launch_command_is_quiet(tmp_path, trained):
    """A user error in the ranks: one line from rank 0, no torchrun report after it."""
    command = "python -m minorsft_megatron.launch --nproc-per-node 2 -m minorsft_megatron.train --config"
    assert command in open(os.path.join(REPO, "README.md")).read()
    done = subprocess.run([sys.executable, "-m", "minorsft_megatron.launch", "--nproc-per-node", "2", "-m",
                           "minorsft_megatron.train", "--config", trained[0], f"checkpoint.load={tmp_path / 'nowhere'}",
                           f"output_dir={tmp_path / 'r'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines == [
        f"error: {tmp_path / 'nowhere'}: neither a checkpoint nor a directory with latest_checkpointed_iteration.txt"]


def test_a_run_asked_to_save_nothing_writes_no_checkpoint(tmp_path, trained):
    """checkpoint.save_final: false with no interval (what the GPU benchmark runs): metrics, no checkpoint."""
    config, init, _ = trained
    code, lines = train(tmp_path, config, f"checkpoint.init={init}", "train_steps=2", "checkpoint.interval=0",
                        "checkpoint.save_final=false", f"output_dir={tmp_path / 'r'}")
    assert code == 0 and lines == [], lines
    assert (tmp_path / "r" / "metrics.jsonl").exists()
    assert not os.path.exists(tmp_path / "r" / "checkpoints") or not os.listdir(tmp_path / "r" / "checkpoints")
    one_error(train(tmp_path, config, "checkpoint.save_final=false", "stop_at_step=1",
                    f"output_dir={tmp_path / 'r2'}"), "command line: checkpoint.save_final: false with stop_at_step")
