"""Shared benchmark plumbing: timing, machine description, table and JSON output, real data."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

#: Flickr8k beside the project (``../shared/data``); benchmarks on real data skip without it.
FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
RESULTS = Path(__file__).resolve().parent / "results"
#: Wide enough for the tables when output goes to a file or a pipe (rich assumes 80 columns).
CONSOLE = Console(width=None if sys.stdout.isatty() else 200)


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each callable, timed in turns (rotating the order every round).

    Timing the contenders round by round rather than one after the other means a burst of
    load from other processes on the machine hits all of them alike, so their ratio holds.
    """
    for run in runs.values():
        run()  # warm-up: caches, lazy initialisation, thread pools
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def parse_sizes(text: str) -> list[int]:
    """``"10000,100k,1M"`` -> ``[10000, 100000, 1000000]``."""
    scale = {"k": 1_000, "m": 1_000_000}
    sizes = []
    for part in text.lower().replace("_", "").split(","):
        part = part.strip()
        factor = scale.get(part[-1:], 1)
        sizes.append(int(float(part.rstrip("km")) * factor))
    return sizes


def reset_peak_rss() -> None:
    """Restart the peak-memory count from the current RSS (Linux >= 4.0; elsewhere a no-op).

    Freed heap memory is first handed back to the system (glibc ``malloc_trim``): otherwise a
    later allocation can reuse pages that are already resident and never show in the peak.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rss_bytes(field: str = "VmHWM") -> int:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident set size in bytes.

    Read from ``/proc/self/status``; where that is missing, ``ru_maxrss`` (a peak since start).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # KiB on Linux, B on macOS


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def unit_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    """``(rows, dim)`` float32 Gaussian directions, made in chunks to bound the float64 scratch."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 65_536):
        block = rng.standard_normal((min(65_536, rows - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def flickr_embeddings(split: str, model: str = "starter") -> Any:
    """``model``'s ``PairEmbeddings`` of a Flickr8k split (``"train"``/``"dev"``).

    Encoded once (minutes on a CPU) and cached by mmret under ``~/.cache/mmret/embeddings``
    (or ``$MMRET_CACHE``), keyed by the model's weights and the exact images and captions.
    """
    from mmret.cache.embeddings import embed_pairs
    from mmret.encoders import load_encoder
    from mmret.ingest.pairs import read_pairs

    return embed_pairs(
        load_encoder(model), read_pairs(FLICKR / f"{split}.jsonl"), show_progress=True
    )


def require_flickr() -> None:
    """Exit with a clear message (status 0: a skip, not a failure) when the data is absent."""
    if not (FLICKR / "train.jsonl").is_file() or not (FLICKR / "dev.jsonl").is_file():
        CONSOLE.print(
            f"skipped: real-data benchmark needs Flickr8k at {FLICKR} (see ../shared/data)",
            style="yellow",
        )
        sys.exit(0)


def raw_faiss(vectors: np.ndarray, kind: str, hnsw_m: int, ef_construction: int) -> Any:
    """The FAISS structure ``FaissIndex`` builds (HNSW-Flat, or IVF-Flat with about 4 sqrt(N)
    lists), built by calling FAISS directly on ``(N, dim)`` vectors."""
    import faiss

    n, dim = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True  # the index keeps its quantizer alive
        index.train(vectors)  # FAISS samples 256 points per list, as mmret does
    index.add(vectors)
    return index


def machine() -> dict[str, Any]:
    import faiss
    import torch

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def report(
    title: str, columns: list[str], rows: list[list[Any]], out: Path, extra: dict[str, Any]
) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_format(v) for v in row))
    console = CONSOLE
    console.print(table)
    details = machine()
    console.print(" ".join(f"{k}={v}" for k, v in details.items()), style="dim")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": details, **extra, "columns": columns, "rows": rows}, indent=2) + "\n"
    )
    console.print(f"wrote {out}", style="dim")
