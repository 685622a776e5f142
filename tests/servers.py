"""Real servers for the tests: `rolechat serve` (and any other command) on a free loopback
port, waited for until it answers, and stopped afterwards; and :func:`in_process`, an app
(usually over the fake engine) under uvicorn exactly as `rolechat serve` runs it, in a thread
of the test process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx

ROLECHAT = Path(sys.executable).parent / "rolechat"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(command: Sequence[str], ready_url: str, *, env: dict[str, str] | None = None,
            timeout: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command``; yield once ``ready_url`` answers at all (a 401 counts: it is up).
    Its output goes to a temporary file (a pipe nobody reads would fill up and stall it)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_up(proc, log, ready_url, timeout)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_up(proc: subprocess.Popen[bytes], log: IO[bytes], url: str,
                   timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{proc.args!r} exited:\n"
                                   f"{log.read().decode(errors='replace')}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args!r} did not answer in {timeout} s") from None
            time.sleep(0.2)


@contextmanager
def rolechat_serve(home: Path, *args: str) -> Iterator[str]:
    """`rolechat serve` with ROLECHAT_HOME=home and a 1024-token context; yields its base URL
    (``http://127.0.0.1:PORT``)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(ROLECHAT), "serve", "--port", str(port), "--context-length", "1024",
               "--threads", "1", *args]
    with running(command, f"{base}/v1/models", env={**os.environ, "ROLECHAT_HOME": str(home)}):
        yield base


@contextmanager
def in_process(app: Any, port: int = 0, **listen: Any) -> Iterator[str]:
    """``app`` served by uvicorn with `rolechat serve`'s listener (``listen``: the options of
    :func:`rolechat.server.listen.config`, e.g. ``header_timeout=0.5``) on a loopback socket
    bound here (``port``: that one, as a restarted server), in a thread; yields its base URL
    (``http://127.0.0.1:PORT``)."""
    import uvicorn

    from rolechat.server.listen import config

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(config(app, host="127.0.0.1", port=port, **listen))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def run_llm(tmp_path: Path, base: str, *args: str,
            supports_schema: bool = False) -> subprocess.CompletedProcess[str]:
    """simonw's `llm` CLI against the server (``supports_schema``: as the user's model
    configuration says, so that ``--schema`` is allowed)."""
    user = tmp_path / "llm"
    user.mkdir(exist_ok=True)
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    schema = "  supports_schema: true\n" if supports_schema else ""
    (user / "extra-openai-models.yaml").write_text(
        f"- model_id: rolechat\n  model_name: {model}\n  api_base: {base}/v1\n{schema}")
    llm = Path(sys.executable).parent / "llm"
    env = {**os.environ, "LLM_USER_PATH": str(user), "OPENAI_API_KEY": "not-needed"}
    return subprocess.run([str(llm), "-m", "rolechat", "--no-log", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
