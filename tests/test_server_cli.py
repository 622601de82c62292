"""``mmret serve`` as a user runs it: a real process on a loopback port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import mmret

pytest.importorskip("uvicorn")
MMRET = Path(sys.executable).with_name("mmret")  # the installed command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> object:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_serve_prints_the_token_and_answers(tmp_path: Path, photo_folder: Path) -> None:
    folder = tmp_path / "index.mmret"
    with mmret.Retriever.create(folder, model="hash:32") as retriever:
        retriever.add(mmret.read_items(photo_folder))
    port = free_port()
    command = [str(MMRET), "serve", str(folder), "--port", str(port)]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    try:
        assert server.stdout is not None
        lines = [server.stdout.readline(), server.stdout.readline()]
        assert f"http://127.0.0.1:{port}/" in lines[0]
        token = lines[1].split()[-1]
        assert lines[1].startswith("write token") and len(token) >= 24
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                health = call(f"{base}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert health == {**health, "status": "ok", "items": 5}  # type: ignore[dict-item]
        body = json.dumps({"text": "a red square", "k": 1}).encode()
        answer = call(f"{base}/search", body, {"Content-Type": "application/json"})
        assert answer["results"][0]["id"] == "red"  # type: ignore[index]
        form = b'--b\r\nContent-Disposition: form-data; name="id"\r\n\r\nnew\r\n' + (
            b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nnew words\r\n--b--\r\n'
        )
        kind = {"Content-Type": "multipart/form-data; boundary=b"}
        with pytest.raises(urllib.error.HTTPError) as refused:
            call(f"{base}/items", form, kind)
        assert refused.value.code == 401
        refused.value.close()  # the error holds the response's socket
        added = call(f"{base}/items", form, {**kind, "Authorization": f"Bearer {token}"})
        assert added == {"added": 1, "ids": ["new"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()
    with mmret.Retriever.open(folder, readonly=True) as reopened:  # the write was kept
        assert len(reopened) == 6


def test_serve_refuses_a_folder_that_is_no_index(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(MMRET), "serve", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "not an mmret index" in result.stderr + result.stdout


def test_serve_says_when_another_writer_holds_the_index(tmp_path: Path) -> None:
    folder = tmp_path / "index.mmret"
    with mmret.Retriever.create(folder, model="hash:32"):  # holds the writer lock
        result = subprocess.run(
            [str(MMRET), "serve", str(folder), "--wait", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "writer" in (result.stderr + result.stdout).lower()
