"""Start a real ``lmaas serve`` process on a free loopback port, for integration tests.

By default the server runs with ``--no-auth`` (allowed on loopback), so tests of other features
need no keys; ``auth=True`` starts it secure by default and reads the first-start admin key from
its log (it is printed only when the home's DB has no tenant yet).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ADMIN_KEY_RE = re.compile(r"admin key: (lmaas-[0-9a-f]{12}-[A-Za-z0-9_-]+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def admin_key(self) -> str | None:
        """The admin key this start printed (first start with auth only), else None."""
        match = ADMIN_KEY_RE.search(self.log())
        return match.group(1) if match else None

    def wait_ready(self, timeout_s: float = 120.0, *, require_ready: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"lmaas serve exited early:\n{self.log()[-4000:]}")
            try:
                live = httpx.get(f"{self.base_url}/v2/health/live", timeout=1)
                ready = httpx.get(f"{self.base_url}/v2/health/ready", timeout=1)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if live.status_code == 200 and (ready.status_code == 200 or not require_ready):
                return
            time.sleep(0.1)
        raise AssertionError(f"lmaas serve was not ready in {timeout_s}s:\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    home: Path,
    models: list[str],
    *extra: str,
    auth: bool = False,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``lmaas serve`` on ``home``; ``auth=False`` adds ``--no-auth`` (loopback only)."""
    port = free_port()
    log_path = home / f"serve-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "lmaas.cli", "serve", "--home", str(home), "--port", str(port)]
    for model in models:
        args += ["--model", model]
    if not auth:
        args.append("--no-auth")
    args += extra
    full_env = {**os.environ, "LMAAS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
