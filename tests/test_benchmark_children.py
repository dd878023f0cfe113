"""benchmarks/children.py: a benchmark's failing child is one line with the child's own error; a missing
dataset stops it in one line saying what to run first."""

import os
import subprocess
import sys

from tests.tokenizers_for_tests import REPO

SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
from children import ensure_dataset, run_child
{call}
print("not reached")
"""


def run_script(call: str):
    code = SCRIPT.format(bench=os.path.join(REPO, "benchmarks"), call=call)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_failing_child_is_one_line_with_its_own_error(tmp_path):
    done = run_script("run_child([sys.executable, '-m', 'minorsft_megatron.score', '--load', "
                      f"{str(tmp_path / 'nowhere')!r}, '--data', 'x', '--out', 'y'], 'scoring')")
    assert done.returncode == 2 and "not reached" not in done.stdout
    assert done.stderr.strip() == (f"error: scoring failed: error: {tmp_path / 'nowhere'}: neither a checkpoint nor "
                                   "a directory with latest_checkpointed_iteration.txt")
    crash = run_script("run_child([sys.executable, '-c', 'raise ValueError(\"bad value\")'], 'the child')")
    assert crash.returncode == 2 and crash.stderr.strip() == "error: the child failed: ValueError: bad value"


def test_a_missing_dataset_says_what_to_run_first(tmp_path):
    done = run_script(f"ensure_dataset({str(tmp_path / 'data')!r})")
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: data.prefix {tmp_path / 'data'}: no dataset there; write it first with tools/preprocess_sft_data.py "
        f"--output-prefix {tmp_path / 'data'} (docs/data.md)")


def test_the_data_prefix_is_read_before_the_config_is_validated(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  prefix: runs/data/nowhere\n")
    done = run_script(f"print(__import__('children').config_data_prefix({str(config)!r})); raise SystemExit(0)")
    assert done.returncode == 0 and done.stdout.strip() == "runs/data/nowhere"


def test_a_crashed_rank_is_reported_by_its_own_error_not_torchruns_box():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from children import child_error

    stderr = "\n".join([
        "[rank0]: Traceback (most recent call last):", '[rank0]:   File "x.py", line 1, in <module>',
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "Traceback (most recent call last):",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "=" * 20,
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html", "=" * 20])
    assert child_error(stderr, 1) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert child_error("note\nerror: data.prefix x: no dataset\n", 2) == "error: data.prefix x: no dataset"
    assert child_error("", 9) == "exit status 9"


def test_repeated_measurements_are_reported_as_median_and_range():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from children import spread

    assert spread([3.0, 1.0, 2.0], 1) == "2.0 (1.0-3.0)"
    assert spread([1.25], 2) == "1.25"


def test_the_logprob_benchmark_repeats_each_path_and_pairs_the_ratios():
    """Tiny sizes (the figures mean nothing): every path measured --repeat times, each row the median and range,
    the ratios to today's taken repeat by repeat."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "logprob_memory.py"), "--vocab", "300",
                           "--seq", "64", "--hidden", "16", "--chunk-size", "16", "--paths", "today", "fused",
                           "--repeat", "2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "median (min-max) of 2 alternating repeats" in lines[0]
    rows = {line.split(" | ")[2]: line.split(" | ") for line in lines if line.startswith("| 300 | 64 |")}
    assert set(rows) == {"today", "fused"}
    assert rows["today"][5].startswith("1.000 (1.000-1.000)")  # today's own ratio, pair by pair
    assert all("(" in cell and "-" in cell for cell in rows["fused"][3:7])
