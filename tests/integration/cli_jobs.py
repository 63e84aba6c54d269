"""Driving a long `lmaas` CLI job the way a terminal user does (integration tests)."""

from __future__ import annotations

import os
import signal
import subprocess


def interrupt_after_first_epoch(command: list[str]) -> str:
    """Run ``command``, press Ctrl-C once it reports epoch 1, and return the rest of its stderr.

    A terminal's Ctrl-C signals the whole foreground process group (the CLI and its job), so the
    command runs in a session of its own and the group gets SIGINT. Asserts the job got to
    epoch 1 and exited 130.
    """
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "LMAAS_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if "epoch 1:" in line:
            break
    assert "epoch 1:" in seen, seen[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen + rest)[-3000:]
    return rest
