"""Running test code in a child process, forked from a clean server process.

Children come from multiprocessing's *forkserver*: a single-threaded process that imports
torch, faiss, mmret and the tests that fork, but never runs anything, so forking it is cheap
and safe. Forking the pytest process itself copied whatever its threads held at that moment:
after the Milvus tests, gRPC's client threads (gRPC then skips its fork handlers, and a child
that opens Milvus can wait forever), and torch's and FAISS's OpenMP pools. A shuffled CI run
hung that way in the crash-safety test.

``work`` and its arguments are pickled to the child: pass module-level functions, and a
:func:`pipe` (not ``os.pipe`` descriptors) to talk back.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
#: Imported once by the server, so that each child starts with them loaded (a test module
#: missing here still works; its children just import it themselves).
_PRELOAD = [
    "torch",
    "faiss",
    "mmret",
    "mmret.cli.main",
    "tests.forking",
    "tests.test_concurrency",
    "tests.test_crash_safety",
    "tests.test_hostile_input",
    "tests.test_token_crash_safety",
]
_CONTEXT.set_forkserver_preload(_PRELOAD)
_ROOT = str(Path(__file__).resolve().parents[1])


def fork(work: Callable[..., object], *args: object) -> BaseProcess:
    """Run ``work(*args)`` in a child process and return it (its ``pid`` to kill it). The
    child exits 0 when ``work`` returns anything but ``False``, and 1 when it returns
    ``False`` or raises."""
    _start_server()
    child = _CONTEXT.Process(target=_run, args=(work, *args), daemon=True)
    child.start()
    return child


def exit_code(child: BaseProcess) -> int:
    """Wait for a child and return its exit code (or -signal if a signal ended it)."""
    child.join()
    assert child.exitcode is not None
    return child.exitcode


def pipe() -> tuple[Connection, Connection]:
    """``(reader, writer)``: give ``writer`` to the child, then close it here (so that
    :func:`received` sees the end once the child is gone)."""
    return _CONTEXT.Pipe(duplex=False)


def received(reader: Connection) -> list[bytes]:
    """Every message still to come on ``reader``, up to the end of the pipe."""
    messages = []
    while True:
        try:
            messages.append(reader.recv_bytes())
        except EOFError:
            return messages


def reports_until_killed(
    work: Callable[..., object],
    *args: object,
    delay: float,
    after_first_report: bool = False,
    first_report_within: float = 120.0,
) -> list[bytes]:
    """Run ``work(*args, writer)`` in a child, SIGKILL it ``delay`` seconds after it started
    (after its first report when ``after_first_report``: a child that sends none within
    ``first_report_within`` seconds fails the test rather than stalling it), and return every
    report it sent on ``writer``."""
    reader, writer = pipe()
    child = fork(work, *args, writer)
    writer.close()
    if after_first_report:
        assert reader.poll(first_report_within), f"no report in {first_report_within} s"
    time.sleep(delay)
    child.kill()
    exit_code(child)
    return received(reader)


def peak_memory_of(work: Callable[..., object], *args: object) -> int:
    """How far running ``work(*args)`` in a child raised that child's resident memory above its
    size when the work began, at the peak, in MB.

    The child measures itself and reports through a pipe: it resets its own high-water mark
    (``VmHWM``) to its current size, runs the work, and reads the mark again. Nothing else
    counts: not the parent's history, nor earlier children (``RUSAGE_CHILDREN`` is the largest
    child reaped so far, which made such a figure depend on the tests run before).
    """
    reader, writer = pipe()
    child = fork(_measure, writer, work, *args)
    writer.close()
    reported = received(reader)
    assert exit_code(child) == 0 and reported, "the measured work failed in the child"
    return max(int(reported[0]), 0) >> 10


def _measure(writer: Connection, work: Callable[..., object], *args: object) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # peak := current (Linux 4.0 and later)
    start = _status_kb("VmRSS")
    work(*args)
    writer.send_bytes(str(_status_kb("VmHWM") - start).encode())


def _run(work: Callable[..., object], *args: object) -> None:
    if work(*args) is False:
        raise SystemExit(1)


def _start_server() -> None:
    """Start the fork server once, able to import ``tests`` (Python 3.11's server ignores the
    parent's ``sys.path``; it does inherit the environment)."""
    with _python_path(_ROOT):
        forkserver.ensure_running()


@contextmanager
def _python_path(folder: str) -> Iterator[None]:
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([folder, before] if before else [folder])
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def _status_kb(field: str) -> int:
    """A ``kB`` figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"/proc/self/status has no {field}")
