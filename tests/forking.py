"""Running test code in a forked child process (cheap: no re-import of torch and faiss)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


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


def peak_memory_of(work: Callable[[], object]) -> int:
    """How far running ``work()`` in a forked child raised that child's resident memory above
    its size when the work began, at the peak, in MB.

    The child measures itself and reports through a pipe: it resets its own high-water mark
    (``VmHWM``) to its current size, runs ``work()``, and reads the mark again. Nothing else
    counts: not the parent's history, nor earlier children (``RUSAGE_CHILDREN`` is the largest
    child reaped so far, which made such a figure depend on the tests run before).
    """
    read_fd, write_fd = os.pipe()

    def measured() -> None:
        os.close(read_fd)
        Path("/proc/self/clear_refs").write_text("5")  # peak := current (Linux 4.0 and later)
        start = _status_kb("VmRSS")
        work()
        os.write(write_fd, str(_status_kb("VmHWM") - start).encode())

    pid = fork(measured)
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        reported = reader.read()
    assert exit_code(pid) == 0 and reported, "the measured work failed in the child"
    return max(int(reported), 0) >> 10


def _status_kb(field: str) -> int:
    """A ``kB`` figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"/proc/self/status has no {field}")
