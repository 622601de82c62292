"""mmret next to the vector databases users would pick instead, on identical data.

    python benchmarks/peers.py --setup       # once: makes benchmarks/peers-venv with the peers
    python benchmarks/peers.py [--items 100000] [--queries 1000] [--repeats 3]

The peers (LanceDB, Chroma, Milvus Lite, qdrant-client local mode) live in their own virtual
environment, ``benchmarks/peers-venv`` (git-ignored), pinned below; none is a dependency of
mmret. Data: ``--items`` clustered 512-d unit vectors (as ``search_throughput.py``) with
metadata ``{"n": i % 100, "tag": one of 10 strings}``, queries near items, k = 10, every system
returning ids and metadata. Per system, each in a child process of its own
(``peer_adapters.py``):

* ingest: items/s of the whole build (the system's default persistent layout and vector
  index; LanceDB also gets B-tree indexes on both metadata columns), and the folder's size;
* cold open: a fresh process opening the folder, then its first query's hits (median over
  ``--repeats`` processes; imports not included);
* search: single queries (one call per query) and one batched call, unfiltered, ``tag = x``
  (10 % of the items) and ``n = 7`` (1 %); q/s are medians over ``--repeats`` passes, the
  systems timed in turns (order rotating every round) so load from other processes hits all
  alike. After a warm-up call, a probe sizes the passes: single queries, as many as take
  about ``--budget`` seconds (at least 3, at most ``--queries``), so the slowest peers
  finish; batches, one size for every system (what the slowest fits in the budget, at least
  10). Recall@10 against exact search over the matching items, on the queries run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any

import numpy as np

from _common import CONSOLE, RESULTS, folder_bytes, report
from peer_adapters import N_VALUE, SYSTEMS, TAG
from search_throughput import exact_truth, recall, synthetic

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / "peers-venv"
PINNED = [
    "lancedb==0.40.0",
    "chromadb==1.5.9",
    "milvus-lite==3.2.2",
    "pymilvus==3.0.2",
    "qdrant-client==1.20.0",
]
TAGS = [f"tag{j}" for j in range(10)]
FILTERS: dict[str | None, str] = {None: "none", "tag": "10 %", "n": "1 %"}
MODES = ("single", "batch")


def setup() -> None:
    venv.create(PEERS_VENV, with_pip=True, clear=True)
    pip = [str(PEERS_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *PINNED], check=True)
    CONSOLE.print(f"installed {', '.join(PINNED)} into {PEERS_VENV}")


BASELINE = "@baseline"


def launch(system: str, scratch: Path, action: str, baseline: Path | None) -> dict[str, Any]:
    """How to run ``peer_adapters.py`` for ``system``: its interpreter, arguments and
    environment. ``name@baseline`` is mmret from the ``--baseline`` source folder instead."""
    python = sys.executable if system.startswith("mmret") else str(PEERS_VENV / "bin" / "python")
    env = dict(os.environ)
    if system.endswith(BASELINE):
        assert baseline is not None
        system, scratch = system.removesuffix(BASELINE), scratch / "baseline"
        env["PYTHONPATH"] = str(baseline)
    command = [python, str(HERE / "peer_adapters.py"), system, str(scratch), action]
    return {"args": command, "env": env, "text": True}


def built_in(scratch: Path, system: str) -> Path:
    if system.endswith(BASELINE):
        return scratch / "baseline" / system.removesuffix(BASELINE)
    return scratch / system


def child(system: str, scratch: Path, action: str, baseline: Path | None) -> dict[str, Any]:
    done = subprocess.run(
        **launch(system, scratch, action, baseline), capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class Server:
    """A child holding one system open, answering timed search commands."""

    def __init__(self, system: str, scratch: Path, baseline: Path | None) -> None:
        self.process = subprocess.Popen(
            **launch(system, scratch, "serve", baseline),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.ask_line()  # {"ready": true}

    def ask_line(self, command: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the child exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def truths(vectors: np.ndarray, queries: np.ndarray, tags: np.ndarray) -> dict[str | None, Any]:
    """Exact top-10 item numbers of every query under each filter."""
    n = len(vectors)
    masks = {None: np.ones(n, bool), "tag": tags == TAG, "n": np.arange(n) % 100 == N_VALUE}
    found = {}
    for name, mask in masks.items():
        rows = np.flatnonzero(mask)
        found[name] = rows[exact_truth(vectors[rows], queries, 10)]
    return found


def measure_searches(
    servers: dict[str, Server], truth: dict[str | None, Any], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {name: {} for name in servers}
    for mode in MODES:
        for filter_ in FILTERS:
            label = f"{mode} {FILTERS[filter_]}"
            probe = 1 if mode == "single" else 10
            counts = {}
            for name, server in servers.items():  # a warm-up, then a probe sizing the passes
                command = {"mode": mode, "filter": filter_, "count": probe}
                server.ask_line(command)
                seconds = server.ask_line(command)["seconds"]
                counts[name] = int(np.clip(args.budget * probe / seconds, 3, args.queries))
            if mode == "batch":  # one batch size for all: per-call costs weigh alike
                counts = dict.fromkeys(counts, max(10, min(counts.values())))
            times: dict[str, list[float]] = {name: [] for name in servers}
            last: dict[str, list[list[int]]] = {}
            names = list(servers)
            for round_ in range(args.repeats):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    command = {"mode": mode, "filter": filter_, "count": counts[name]}
                    answer = servers[name].ask_line(command)
                    times[name].append(answer["seconds"])
                    last[name] = answer["ids"]
            for name in servers:
                found = np.full((counts[name], 10), -1)
                for row, ids in zip(found, last[name], strict=True):
                    row[: len(ids)] = ids[:10]
                results[name][label] = {
                    "qps": counts[name] / statistics.median(times[name]),
                    "recall": recall(found, truth[filter_][: counts[name]]),
                    "queries": counts[name],
                }
            CONSOLE.print(
                f"  {label}: "
                + ", ".join(f"{n} {r[label]['qps']:,.1f} q/s" for n, r in results.items()),
                style="dim",
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="make benchmarks/peers-venv")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per timed pass")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another mmret's src folder (e.g. `git archive main src`): adds its backends, "
        "run on the same data, as mmret-exact@baseline and mmret-faiss@baseline",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a minute or so")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if args.quick:
        args.items, args.queries, args.repeats, args.budget = 3000, 50, 1, 0.2
    systems = args.systems.split(",")
    if args.baseline:
        systems += [f"mmret-{backend}{BASELINE}" for backend in ("exact", "faiss")]
    if not (PEERS_VENV / "bin" / "python").is_file() and any(
        not s.startswith("mmret") for s in systems
    ):
        sys.exit(f"the peers are not installed: run `python {Path(__file__).name} --setup` first")

    vectors, queries = synthetic(args.items, args.queries, args.dim)
    tags = np.asarray(TAGS)[np.random.default_rng(6).integers(0, len(TAGS), args.items)]
    truth = truths(vectors, queries, tags)
    rows: list[list[Any]] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        np.save(scratch / "vectors.npy", vectors)
        np.save(scratch / "queries.npy", queries)
        np.save(scratch / "tags.npy", tags)
        (scratch / "baseline").mkdir()
        for name in ("vectors.npy", "queries.npy", "tags.npy"):
            (scratch / "baseline" / name).symlink_to(scratch / name)
        built: dict[str, dict[str, Any]] = {}
        for system in systems:
            try:
                seconds = child(system, scratch, "build", args.baseline)["seconds"]
                colds = [child(system, scratch, "cold", args.baseline) for _ in range(args.repeats)]
            except RuntimeError as error:
                failed[system] = str(error)
                CONSOLE.print(f"  {system}: failed ({error})", style="red")
                continue
            built[system] = {
                "ingest": args.items / seconds,
                "disk": folder_bytes(built_in(scratch, system)) / 2**20,
                "open": statistics.median(c["open"] for c in colds),
                "first": statistics.median(c["first_hits"] for c in colds),
            }
            CONSOLE.print(f"  {system}: {built[system]}", style="dim")
        servers = {system: Server(system, scratch, args.baseline) for system in built}
        try:
            searches = measure_searches(servers, truth, args)
        finally:
            for server in servers.values():
                server.close()
    labels = [f"{m} {f}" for m in MODES for f in FILTERS.values()]
    for system, figures in built.items():
        found = searches[system]
        rows.append(
            [
                system,
                figures["ingest"],
                figures["disk"],
                figures["open"],
                figures["first"],
                *(found[label]["qps"] for label in labels),
                " / ".join(f"{found[label]['recall']:.3f}" for label in labels),
            ]
        )
    report(
        f"mmret and peers: {args.items:,} items, {args.dim}-d, k=10, medians of {args.repeats}",
        [
            "system",
            "ingest items/s",
            "disk MiB",
            "open s",
            "open + first hits s",
            *(f"{label} q/s" for label in labels),
            f"recall@10 ({', '.join(labels)})",
        ],
        rows,
        args.out,
        {
            "failed": failed,
            "searches": searches,
            "args": {k: str(v) for k, v in vars(args).items()},
        },
    )
    for system, why in failed.items():
        CONSOLE.print(f"{system} did not run: {why}", style="red")


if __name__ == "__main__":
    main()
