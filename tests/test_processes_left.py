"""No process outlives what started it: the checkpoint writer's Manager server dies with its rank, and a pytest
session (passed, or interrupted with Ctrl-C) leaves no worker, fork server or server behind.

Before: each run of the suite left two Manager servers (about 270 MB each) from the crash-while-saving test,
reparented to init for good."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.distributed import spawn
from tests.tokenizers_for_tests import REPO

MARK = "MINORSFT_TEST_PROCESS_MARK"


def rank_with_writer_queue(then: str, flags: str) -> None:
    """A rank that makes megatron-core's checkpoint writer start its Manager (as a first save does), writes the
    server's pid to `flags`/rankR, then ends as `then` says: 'exit' as a killed rank does (os._exit, no
    clean-up), 'wait' by waiting to be interrupted."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as writer

    from minorsft_megatron import compat

    compat.apply()
    get_queue = getattr(writer, "get_write_results_queue", None) or writer._get_write_results_queue
    server = get_queue()._manager._process.pid
    flag = Path(flags) / f"rank{os.environ['RANK']}"
    flag.with_suffix(".tmp").write_text(str(server))
    flag.with_suffix(".tmp").rename(flag)
    if then == "exit":
        os._exit(17)
    time.sleep(600)


def living(pids) -> list[int]:
    """Those of `pids` that are running (a zombie has ended)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def marked(mark: str) -> list[int]:
    """Running processes whose environment holds MARK=mark (every descendant of a process started with it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        return f"{pid} (gone)"


def wait_until(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def server_pids(flags: Path, ranks: int) -> list[int]:
    assert wait_until(lambda: len(list(flags.glob("rank?"))) == ranks, 120), "the ranks never started their servers"
    return [int(p.read_text()) for p in sorted(flags.glob("rank?"))]


def test_the_checkpoint_writers_server_dies_with_its_rank(tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    with pytest.raises(AssertionError, match=r"exit codes \[17\]"):
        spawn(1, rank_with_writer_queue, "exit", str(flags), out_dir=tmp_path / "job")
    servers = server_pids(flags, 1)
    assert wait_until(lambda: not living(servers), 15), f"the server {servers} outlived its rank"


@pytest.mark.parametrize("then", ["exit", "wait"])
def test_a_pytest_session_leaves_no_process(tmp_path, then):
    """A session whose test leaves dead ranks' servers ('exit'), or that is interrupted while two ranks run
    ('wait'): once pytest has returned, no process it started is left (counted by an environment mark)."""
    flags = tmp_path / "flags"
    flags.mkdir()
    inner = tmp_path / "test_inner.py"
    inner.write_text(textwrap.dedent(f"""
        import pytest
        from tests.distributed import spawn
        from tests.test_processes_left import rank_with_writer_queue

        def test_ranks(tmp_path):
            with pytest.raises(AssertionError):
                spawn(2, rank_with_writer_queue, {then!r}, {str(flags)!r}, out_dir=tmp_path / "job", timeout=600)
    """))
    mark = uuid.uuid4().hex
    log = tmp_path / "inner.log"  # a file, not a pipe: a process left behind would hold a pipe open
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "tests.process_cleanup", "-c",
             os.path.join(REPO, "pytest.ini"), "--rootdir", REPO, "-p", "no:cacheprovider", str(inner)],
            cwd=REPO, env=dict(os.environ, **{MARK: mark}), stdout=out, stderr=subprocess.STDOUT)
    try:
        servers = server_pids(flags, 2)
        if then == "wait":
            assert len(marked(mark)) >= 6  # pytest, the fork server, two ranks and their two servers
            proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends pytest
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == (0 if then == "exit" else 2), log.read_text()
    assert wait_until(lambda: not marked(mark), 15), f"left running: {[cmdline(p) for p in marked(mark)]}"
    assert not living(servers)
