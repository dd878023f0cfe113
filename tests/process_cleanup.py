"""A pytest plugin that leaves no process behind: the session's process adopts its orphaned descendants (Linux's
child subreaper) and, when the session ends (passed, failed, `-x`, or Ctrl-C), ends every descendant still there:
the fork server tests/distributed.py starts, ranks a test left running, and anything they started.

Loaded by tests/conftest.py; `-p tests.process_cleanup` loads it into a pytest run outside tests/."""

from __future__ import annotations

import sys

import psutil

PR_SET_CHILD_SUBREAPER = 36


def _adopt_orphans() -> None:
    """Orphaned descendants become this process's children, not init's, so they can still be found."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def _is_resource_tracker(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker, which ends by itself once this process has exited and cleans up what
    the others leaked; ending it first would leave that behind."""
    try:
        return any("multiprocessing.resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False


def end_descendants(grace: float = 10.0) -> None:
    """SIGTERM every descendant of this process but the resource tracker, then SIGKILL what is left after
    `grace` seconds; reap them."""
    left = [p for p in psutil.Process().children(recursive=True) if not _is_resource_tracker(p)]
    for signal_them in (psutil.Process.terminate, psutil.Process.kill):
        for proc in left:
            try:
                signal_them(proc)
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(left, timeout=grace)
        if not left:
            return


def pytest_configure(config) -> None:
    _adopt_orphans()


def pytest_sessionfinish(session, exitstatus) -> None:
    end_descendants()
