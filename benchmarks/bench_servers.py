"""Servers under test for the benchmark scripts: start, wait, read the admin key, clean up."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ADMIN_KEY_RE = re.compile(r"admin key: (lmaas-[0-9a-f]{12}-[A-Za-z0-9_-]+)")


def admin_key(log: Path, keep: Path) -> str | None:
    """The admin key of an lmaas home: a fresh ``lmaas serve`` prints it once (secure by
    default), so it is kept in ``keep`` for the later servers on the same home."""
    match = ADMIN_KEY_RE.search(log.read_text(errors="replace"))
    if match:
        keep.write_text(match.group(1))
    return keep.read_text().strip() if keep.exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server_process(
    cmd: list[str], log: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in its own process group; on exit SIGTERM it, then SIGKILL the group."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_tail(log: Path, num_lines: int = 4) -> str:
    """The last few non-blank lines of a server log: usually the exception that stopped it."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(ln.strip() for ln in lines[-num_lines:])


def wait_http(
    proc: subprocess.Popen[bytes], url: str, timeout_s: float, log: Path, fail_marker: str = ""
) -> str | None:
    """Poll ``url`` until 200; return None when up, else why not (early on ``fail_marker``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}: {log_tail(log)} (log: {log})"
        if fail_marker and fail_marker in log.read_text(errors="replace"):
            return f"{log_tail(log, 8)} (log: {log})"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return None
        time.sleep(0.5)
    return f"not ready after {timeout_s:.0f} s: {log_tail(log)} (log: {log})"
