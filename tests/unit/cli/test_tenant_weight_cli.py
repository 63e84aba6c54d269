"""``lmaas tenants create --weight`` and ``lmaas tenants weight``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmaas.cli.main import app


def _run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [*args, "--home", str(home)], env={"COLUMNS": "160"})
    return result.exit_code, result.stdout, result.stderr


def test_tenant_weights_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LMAAS_HOME", "LMAAS_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    assert _run(home, "tenants", "create", "gold", "--weight", "3")[0] == 0
    assert _run(home, "tenants", "create", "plain")[0] == 0
    code, out, _ = _run(home, "tenants", "list", "--json")
    assert code == 0
    assert {t["name"]: t["weight"] for t in json.loads(out)} == {"gold": 3.0, "plain": 1.0}
    code, out, _ = _run(home, "tenants", "weight", "plain", "2")
    assert code == 0 and "weight 2" in out
    code, _, err = _run(home, "tenants", "weight", "plain", "0")
    assert code == 1 and "weight must be above 0" in err
    code, out, _ = _run(home, "tenants", "list")
    assert "WEIGHT" in out
