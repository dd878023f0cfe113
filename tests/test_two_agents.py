"""Two torchrun agents on one machine (`python -m minorsft_megatron.launch --nnodes 2`, c10d rendezvous on
127.0.0.1), as two nodes would run them: TP = 2 across the agents gives one agent's metrics bit for bit (fp32);
one agent killed (SIGKILL, as a node dies), the other stops within a bound with one line and exit status 3."""

import os
import signal
import subprocess
import sys
import time

from tests.distributed import free_port
from tests.train_workers import metrics, tiny_config, wait_for_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOST_BOUND_S = 60  # from the SIGKILL to the other agent's exit: gloo sees the reset connection at once


def agent(config, out, *overrides, nnodes, nproc, endpoint, **popen):
    argv = [sys.executable, "-m", "minorsft_megatron.launch", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-agents",
            "-m", "minorsft_megatron.train", "--config", config, f"output_dir={out}", "parallel.tp=2",
            "logging.interval=1", *overrides]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def test_tensor_parallel_across_two_agents_equals_one_agent(tmp_path, data_prefix):
    config = tiny_config(tmp_path, data_prefix)
    code, _, stderr = finish(agent(config, tmp_path / "one", "train_steps=4", nnodes=1, nproc=2,
                                   endpoint=f"127.0.0.1:{free_port()}"))
    assert code == 0, stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [agent(config, tmp_path / "two", "train_steps=4", nnodes=2, nproc=1, endpoint=endpoint)
              for _ in range(2)]
    for proc in agents:
        code, _, stderr = finish(proc)
        assert code == 0, stderr[-3000:]
    one = metrics(tmp_path / "one")
    assert len(one) == 4 and metrics(tmp_path / "two") == one


def test_one_agent_killed_the_other_stops_in_bounded_time_with_one_line(tmp_path, data_prefix):
    config = tiny_config(tmp_path, data_prefix)
    out, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    survivor, victim = [agent(config, out, "train_steps=100000", "data.epochs=1000", nnodes=2, nproc=1,
                              endpoint=endpoint) for _ in range(2)]
    try:
        wait_for_steps(out, 1, lambda: survivor.poll() is None and victim.poll() is None)
        victim.send_signal(signal.SIGKILL)  # the agent and, with it (die_with_launcher), its rank
        killed = time.monotonic()
        code, _, stderr = finish(survivor, timeout=LOST_BOUND_S + 60)
        seconds = time.monotonic() - killed
    finally:  # a failed check leaves no agent training on
        for proc in (survivor, victim):
            if proc.returncode is None:
                proc.kill()
                proc.communicate()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 3 and seconds < LOST_BOUND_S and "Traceback" not in stderr, (code, seconds, stderr[-3000:])
    # its rank lost its peer and/or (where the victim held the rendezvous store) the agent lost the store: one
    # line from each process that saw it
    assert 1 <= len(errors) <= 2 and all("lost another rank of the job" in e or "lost the rendezvous store" in e
                                         for e in errors), stderr[-3000:]
