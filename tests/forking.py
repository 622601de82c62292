"""Running test code in a forked child process (cheap: no re-import of torch and faiss)."""

from __future__ import annotations

import os
from collections.abc import Callable


def fork(work: Callable[[], object]) -> int:
    """Run ``work`` in a child process; returns its pid. The child exits 0 when ``work``
    returns anything but ``False``, and 1 when it returns ``False`` or raises."""
    pid = os.fork()
    if pid:
        return pid
    code = 1  # pragma: no cover - the rest runs in the child, which never returns
    try:
        import faiss

        # OpenMP thread pools do not survive fork(): with one thread FAISS never uses them.
        faiss.omp_set_num_threads(1)
        code = 0 if work() is not False else 1
    finally:
        os._exit(code)


def exit_code(pid: int) -> int:
    """Wait for a child and return its exit code (or -signal if a signal ended it)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
