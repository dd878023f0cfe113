"""Processes that must not outlive the process that started them: a rank its launcher, the checkpoint writer's
Manager server its rank."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send this process `sig` when its parent (pid `parent`, which must be the caller's parent
    now) dies; if it died already, before the request took effect, end now. Linux only; elsewhere nothing.

    The kernel sends it when the parent's *thread* that started this process ends: call it only in processes
    started from their parent's main thread."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
