"""What the benchmarks share: running a child command so that its failure is one line with the child's own
error (not a CalledProcessError traceback), the quickstart data they measure on, prepared when missing, and how
repeated measurements are reported."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_DATA = os.path.join("runs", "data", "sft_train")
WARMUP_STEPS = 3
"""Steps of a timed training run left out of its step time."""
"""The dataset examples/tiny_cpu.yaml reads (relative to the repository), written by examples/quickstart.sh."""


def child_error(stderr: str, returncode: int) -> str:
    """The child's own error: its last one-line `error: ...`, else the last exception line of its tracebacks
    (a rank's, not torchrun's report box), else its last line."""
    lines = [re.sub(r"^\[(rank|default)\d*\]:\s*", "", line.strip()) for line in stderr.splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("error: ")]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)
              and "ChildFailedError" not in line]  # torchrun's own, after the rank's
    return (own or raised or lines or [f"exit status {returncode}"])[-1]


def run_child(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` (stdout and stderr captured); on failure stop this benchmark with one line naming `what` and
    the child's error."""
    done = subprocess.run(cmd, cwd=kwargs.pop("cwd", REPO), capture_output=True, text=True, **kwargs)
    if done.returncode:
        print(f"error: {what} failed: {child_error(done.stderr, done.returncode)}", file=sys.stderr)
        raise SystemExit(2)
    return done


def config_data_prefix(config: str) -> str:
    """data.prefix of a training config, read before the config is validated (which needs the dataset)."""
    import yaml

    with open(config if os.path.isabs(config) else os.path.join(REPO, config), encoding="utf-8") as f:
        return ((yaml.safe_load(f) or {}).get("data") or {}).get("prefix", "")


def ensure_dataset(prefix: str) -> None:
    """The dataset at `prefix` exists: the quickstart's is prepared as examples/quickstart.sh prepares it; for any
    other, stop in one line saying what to run first."""
    path = prefix if os.path.isabs(prefix) else os.path.join(REPO, prefix)
    if os.path.isfile(f"{path}.json"):
        return
    if os.path.normpath(prefix) != QUICKSTART_DATA:
        print(f"error: data.prefix {prefix}: no dataset there; write it first with tools/preprocess_sft_data.py "
              f"--output-prefix {prefix} (docs/data.md)", file=sys.stderr)
        raise SystemExit(2)
    print(f"preparing {prefix} (as examples/quickstart.sh does)", file=sys.stderr)
    run_child([sys.executable, "tools/preprocess_sft_data.py", "--input", "examples/data/sft_train.jsonl",
               "--tokenizer", "examples/data/tokenizer.model", "--chat-template", "chatml", "--seq-length", "128",
               "--output-prefix", prefix, "--workers", "2"], f"preparing {prefix}")


def spread(values: list[float], digits: int) -> str:
    """`median (min-max)` of repeated measurements (the median alone for one)."""
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:.{digits}f}"
    return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def torchrun(nproc: int, module: str, args: list[str]) -> None:
    """`python -m minorsft_megatron.launch` of `module` on `nproc` processes (a rendezvous port picked by pid)."""
    cmd = [sys.executable, "-m", "minorsft_megatron.launch", "--nproc-per-node", str(nproc), "--master-port",
           str(29400 + os.getpid() % 500), "-m", module, *args]
    run_child(cmd, module)


def step_time_and_memory(run_dir: str) -> tuple[float, float]:
    """A training run's median seconds per step after WARMUP_STEPS, and its peak memory (GiB), from metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [r for r in rows if "eval" not in r]  # training steps only
    timed = [r["seconds_per_iteration"] for r in rows[WARMUP_STEPS:]]
    return statistics.median(timed), max(r["memory_gib"] for r in rows)
