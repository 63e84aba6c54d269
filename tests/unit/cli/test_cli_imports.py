"""What starting the ``lmaas`` CLI imports: every command pays for it, so the heavy stacks that
only some commands need (the HTTP app, torch) are imported inside those commands."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "starlette", "uvicorn", "torch", "transformers", "onnxruntime")


def test_loading_the_cli_imports_no_web_or_model_stack() -> None:
    probe = f"import sys, lmaas.cli.main; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""
