"""Time limits and preemption under torchrun (minorsft_megatron.launch, 2 ranks): SIGUSR1 (what Slurm's
--signal=USR1@S sends) or SIGTERM (preemption) to the agent makes every rank save a checkpoint at the next step
boundary and exit 0 with one line, within a bound; the same command then resumes from that checkpoint, and its
steps equal a straight run's bit for bit (fp32)."""

import os
import signal
import subprocess
import sys
import time

from tests.train_workers import metrics, tiny_config, wait_for_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
BOUND_S = 60  # from the signal to the agent's exit: one step, one save and the shutdown, on two CPU cores


def command(config, out):
    return [sys.executable, "-m", "minorsft_megatron.launch", "--nproc-per-node", "2", "-m", "minorsft_megatron.train",
            "--config", config, f"output_dir={out}", f"train_steps={STEPS}", "logging.interval=1",
            "checkpoint.interval=0"]


def run_to_signal(config, out, sig):
    """Start the run, send `sig` to the agent once a step is logged; (exit status, seconds to exit, stdout)."""
    launcher = subprocess.Popen(command(config, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        wait_for_steps(out, 1, lambda: launcher.poll() is None)
    except AssertionError:
        launcher.kill()
        raise AssertionError(launcher.communicate())
    sent = time.time()
    launcher.send_signal(sig)
    stdout, stderr = launcher.communicate(timeout=BOUND_S + 60)
    return launcher.returncode, time.time() - sent, stdout, stderr


def test_a_signal_saves_at_the_next_step_and_resumes_bit_for_bit(tmp_path, data_prefix):
    config = tiny_config(tmp_path, data_prefix)
    straight = tmp_path / "straight"
    subprocess.run(command(config, straight), cwd=REPO, check=True, capture_output=True, timeout=300)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        out = tmp_path / sig.name
        code, seconds, stdout, stderr = run_to_signal(config, out, sig)
        stopped = [line for line in stdout.splitlines() if line.startswith("stopped on")]
        assert code == 0 and seconds < BOUND_S and len(stopped) == 1, (code, seconds, stdout[-2000:], stderr[-2000:])
        rows = metrics(out)
        k = rows[-1]["iteration"]
        assert stopped[0].startswith(f"stopped on {sig.name} at iteration {k}: checkpoint ") and k < STEPS
        assert os.path.isdir(out / "checkpoints" / f"iter_{k:07d}") and rows == metrics(straight)[:k]
    subprocess.run(command(config, out), cwd=REPO, check=True, capture_output=True, timeout=300)  # the same command
    assert metrics(out) == metrics(straight)  # steps 1..k before the signal, k+1.. after the resume, bit for bit


def test_a_signal_before_the_ranks_are_up_waits_for_them(tmp_path, data_prefix):
    """SIGUSR1 to the agent half a second after it starts, while it checks the config and the ranks import (the
    default action would kill them): the ranks start with it blocked, so it waits pending until their stop
    handler is installed, and the run stops at the first step boundary with a checkpoint, exit 0."""
    config = tiny_config(tmp_path, data_prefix)
    out = tmp_path / "early"
    launcher = subprocess.Popen(command(config, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        time.sleep(0.5)
        launcher.send_signal(signal.SIGUSR1)
        stdout, stderr = launcher.communicate(timeout=240)
    finally:  # a hung run is not left training
        if launcher.returncode is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, (stdout[-2000:], stderr[-2000:])
    assert [line for line in stdout.splitlines() if line.startswith("stopped on")] == [
        f"stopped on SIGUSR1 at iteration 1: checkpoint {out}/checkpoints/iter_0000001 saved; the same command "
        "resumes from it"]


UNINSTALL = """
import os, signal, sys
from minorsft_megatron.launch import StopForwarder
seen = []
signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # a handler of the module's own
forwarder = StopForwarder().install()
os.kill(os.getpid(), signal.SIGTERM)  # kept by the forwarder
assert seen == [] and forwarder.signum == signal.SIGTERM
forwarder.uninstall()  # the module's handler back, the kept signal raised again into it
assert seen == [signal.SIGTERM], seen
assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
os.kill(os.getpid(), signal.SIGUSR1)  # the default action again: the process ends
sys.exit(5)
"""


def test_a_module_other_than_training_gets_its_signal_handlers_back():
    """Under the launcher a module other than the trainer keeps torchrun's signal handling: StopForwarder.uninstall
    puts back the handlers set before it (SIG_DFL for SIGUSR1 here) and raises again a signal kept meanwhile."""
    done = subprocess.run([sys.executable, "-c", UNINSTALL], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGUSR1, (done.returncode, done.stderr[-2000:])
