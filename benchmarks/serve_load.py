"""Load on ``mmret serve`` over loopback: queries/s and latency with 1, 8 and 32 clients,
with and without a writer adding photos at the same time.

    python benchmarks/serve_load.py [--clients 1,8,32] [--duration 20] [--bar-duration 60]

The server is ``mmret serve`` in a process of its own, over the 1,000 Flickr8k dev photos
embedded by the default ``starter`` model (the demo's photos without ``../shared/data``).
Each client is a thread with one keep-alive connection that sends text queries (dev captions,
``k=10``) back to back, each waiting for its answer (closed loop). The writer is one more
client that adds Flickr8k train photos with their captions through ``POST /items`` (with the
token), one per request, back to back. Every phase runs for ``--duration`` seconds (the
32-client phase with the writer for ``--bar-duration``) or ``--max-requests``, whichever ends
first. After all phases every item the server acknowledged is fetched back: "lost" counts
those missing. ``--compare-batching`` adds 32-client phases against a server started with
``--max-batch 1`` (no batching), in turns with the default server.

Reported per phase: requests, failures (any status but 200/201, or a dropped connection),
q/s, p50/p95/p99 latency of the queries, writes done, how busy the server's encoder thread was
(seconds of encoding per second, from its /metrics) and its mean query batch, and the load
average of the machine during the phase (other processes' work included).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from _common import CONSOLE, FLICKR, RESULTS, flickr_embeddings, report
from mmret.demo import TEXT_QUERIES, write_photos
from mmret.engine import Retriever
from mmret.ingest.pairs import read_pairs
from mmret.ingest.sources import read_items
from mmret.items import Item

MMRET = Path(sys.executable).with_name("mmret")


@dataclass
class Phase:
    clients: int
    writer: bool
    server: str = "batched"
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load: list[float] = field(default_factory=list)
    encoder: dict[str, float] = field(default_factory=dict)


def build_index(folder: Path, quick: bool) -> tuple[list[str], list[tuple[str, Path, str]]]:
    """Index the dev photos; return query captions and ``(id, image, caption)`` to add."""
    if (FLICKR / "dev.jsonl").is_file():
        dev = read_pairs(FLICKR / "dev.jsonl")
        vectors = flickr_embeddings("dev").image  # cached starter embeddings
        items = [Item(i, image=str(p)) for i, p in zip(dev.image_ids, dev.images, strict=True)]
        with Retriever.create(folder, model="starter") as retriever:
            retriever.add_vectors(items, vectors)
        train = [json.loads(line) for line in (FLICKR / "train.jsonl").open()]
        to_add = [(f"new/{t['id']}", FLICKR / t["image"], t["captions"][0]) for t in train]
        return list(dev.texts), to_add
    CONSOLE.print(f"no Flickr8k at {FLICKR}: using the demo's photos", style="yellow")
    photos = write_photos(folder.parent / "photos")
    with Retriever.create(folder, model="starter") as retriever:
        retriever.add(read_items(photos))
    images = sorted(p for p in photos.rglob("*") if p.suffix in {".jpg", ".png"})
    to_add = [(f"new/{n}-{p.stem}", p, p.stem) for n in range(1000) for p in images]
    return list(TEXT_QUERIES), to_add


@contextmanager
def serving(folder: Path, token: str, extra: list[str], threads: int | None) -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    env = dict(os.environ, MMRET_TOKEN=token)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [str(MMRET), "serve", str(folder), "--port", str(port), *extra]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if request(port, "GET", "/health")[0] == 200:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the server did not start")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


class Connection:
    """One keep-alive connection to the server; a dropped one is reopened, and the request
    that met it is answered with status -1 (a failure)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        try:
            self.http.request(method, path, body=body, headers=headers or {})
            response = self.http.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            self.http.close()
            self.http = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            return -1, str(error).encode()

    def close(self) -> None:
        self.http.close()


def request(port: int, method: str, path: str) -> tuple[int, bytes]:
    connection = Connection(port)
    try:
        return connection.call(method, path)
    finally:
        connection.close()


def encoder_totals(port: int) -> dict[str, float]:
    text = request(port, "GET", "/metrics")[1].decode()
    totals = {}
    for name in ("batch_size_sum", "batch_size_count", "seconds_sum"):
        for kind in ("query", "item"):
            pattern = rf'^mmret_encoder_{name}{{kind="{kind}"}} (\S+)$'
            match = re.search(pattern, text, re.MULTILINE)
            totals[f"{kind}_{name}"] = float(match.group(1)) if match else 0.0
    return totals


def multipart(fields: dict[str, str], image: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + image.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def run_phase(
    port: int,
    phase: Phase,
    queries: list[str],
    to_add: Iterator[tuple[str, Path, str]],
    token: str,
    duration: float,
    max_requests: int,
) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    sent = [0]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = Connection(port)
        headers = {"Content-Type": "application/json"}
        while not stop.is_set():
            with lock:
                if sent[0] >= max_requests:
                    stop.set()
                    break
                sent[0] += 1
            body = json.dumps({"text": rng.choice(queries), "k": 10}).encode()
            started = time.perf_counter()
            status, answer = connection.call("POST", "/search", body, headers)
            elapsed = time.perf_counter() - started
            ok = status == 200 and len(json.loads(answer)["results"]) == 10
            with lock:
                phase.latencies.append(elapsed)
                if not ok:
                    phase.failures.append(f"search {status}: {answer[:200]!r}")
        connection.close()

    def writer() -> None:
        connection = Connection(port)
        while not stop.is_set():
            item_id, image, caption = next(to_add)
            body, kind = multipart({"id": item_id, "text": caption}, image)
            headers = {"Content-Type": kind, "Authorization": f"Bearer {token}"}
            status, answer = connection.call("POST", "/items", body, headers)
            with lock:
                if status == 201:
                    phase.written.append(item_id)
                else:
                    phase.failures.append(f"add {status}: {answer[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(phase.clients)]
    if phase.writer:
        threads.append(threading.Thread(target=writer))
    before = encoder_totals(port)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    phase.load.append(os.getloadavg()[0])
    while not stop.wait(min(5.0, duration / 4)):
        phase.load.append(os.getloadavg()[0])
        if time.perf_counter() - started >= duration:
            stop.set()
    for thread in threads:
        thread.join()
    phase.seconds = time.perf_counter() - started
    after = encoder_totals(port)
    phase.encoder = {name: after[name] - before[name] for name in after}


def summary(phase: Phase) -> list[Any]:
    latencies = np.asarray(phase.latencies) * 1000
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (0, 0, 0)
    encoder = phase.encoder
    busy = (encoder["query_seconds_sum"] + encoder["item_seconds_sum"]) / phase.seconds
    batches = encoder["query_batch_size_count"]
    mean_batch = encoder["query_batch_size_sum"] / batches if batches else 0.0
    return [
        phase.clients,
        "yes" if phase.writer else "no",
        phase.server,
        len(phase.latencies),
        len(phase.failures),
        round(len(phase.latencies) / phase.seconds, 1),
        round(float(p50), 1),
        round(float(p95), 1),
        round(float(p99), 1),
        len(phase.written),
        round(busy, 2),
        round(mean_batch, 1),
        f"{min(phase.load):.1f}-{max(phase.load):.1f}",
        round(phase.seconds, 1),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="Concurrent query clients per phase.")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds per phase.")
    parser.add_argument(
        "--bar-duration", type=float, default=60.0, help="Seconds of the 32-client writer phase."
    )
    parser.add_argument("--max-requests", type=int, default=100_000, help="Queries per phase.")
    parser.add_argument(
        "--threads", type=int, help="Torch threads of the server (default: its own)."
    )
    parser.add_argument("--compare-batching", action="store_true", help="Also run --max-batch 1.")
    parser.add_argument("--quick", action="store_true", help="A smoke run of a few seconds.")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.quick:
        clients, args.duration, args.bar_duration = [1, 8], 3.0, 3.0
    token = secrets.token_urlsafe(16)
    scratch = Path(tempfile.mkdtemp(prefix="mmret-serve-load-"))
    phases: list[Phase] = []
    try:
        folder = scratch / "index.mmret"
        queries, to_add = build_index(folder, args.quick)
        additions = iter(to_add)
        servers: dict[str, list[str]] = {"batched": []}
        if args.compare_batching:
            servers["unbatched"] = ["--max-batch", "1"]
        with Retriever.open(folder, readonly=True) as opened:
            at_start = len(opened)
        for name, extra in servers.items():
            with serving(folder, token, extra, args.threads) as port:
                for count in clients if name == "batched" else [max(clients)]:
                    for with_writer in (False, True):
                        if name == "unbatched" and with_writer:
                            continue
                        phase = Phase(count, with_writer, name)
                        long = with_writer and count == max(clients)
                        seconds = args.bar_duration if long else args.duration
                        CONSOLE.print(
                            f"{count} clients, writer {with_writer}, {name}: {seconds:.0f} s"
                        )
                        run_phase(
                            port, phase, queries, additions, token, seconds, args.max_requests
                        )
                        phases.append(phase)
                        CONSOLE.print(summary(phase), style="dim")
                written = [item for phase in phases for item in phase.written]
                lost = [i for i in written if request(port, "GET", f"/items/{i}")[0] != 200]
                health = json.loads(request(port, "GET", "/health")[1])
        columns = [
            "clients",
            "writer",
            "server",
            "queries",
            "failed",
            "q/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "items added",
            "encoder busy",
            "mean batch",
            "load avg",
            "s",
        ]
        report(
            f"mmret serve under load, text queries, k=10: {at_start:,} items at the start, "
            f"{len(written):,} added, {len(lost)} of them lost, {health['items']:,} at the end",
            columns,
            [summary(phase) for phase in phases],
            args.out,
            {
                "lost": len(lost),
                "added": len(written),
                "items_at_end": health["items"],
                "items_at_start": at_start,
                "failures": [f for phase in phases for f in phase.failures][:20],
                "threads": args.threads,
            },
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
