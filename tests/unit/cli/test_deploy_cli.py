"""``lmaas deploy``: set, canary, promote through the gate, rollback, scale, split, history."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import typer
from safetensors.numpy import save_file
from typer.testing import CliRunner

from lmaas.cli.deploy import deploy_command
from lmaas.registry.lifecycle_db import StoredMetric
from lmaas.registry.service import RegistryService

app = typer.Typer()
app.command()(deploy_command)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("LMAAS_HOME", "LMAAS_DATABASE_URL", "LMAAS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    src = tmp_path / "m"
    src.mkdir()
    config = {"architectures": ["BertModel"], "model_type": "bert", "max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(src / "model.safetensors"))
    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        for accuracy in (0.9, 0.5, 0.95):
            manifest = registry.import_model(str(src), name="m")
            metric = StoredMetric("accuracy", accuracy, "d" * 64, "x", "", 10, datetime.now(UTC))
            registry.add_metrics(manifest, [metric])
    return home


def _run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [*args, "--home", str(home)])
    return result.exit_code, result.stdout, result.stderr


def _json(home: Path, *args: str) -> dict[str, object]:
    code, out, err = _run(home, *args, "--json")
    assert code == 0, err
    body: dict[str, object] = json.loads(out)
    return body


def test_canary_gate_promote_rollback_and_history(home: Path) -> None:
    code, _, err = _run(home, "m")
    assert code == 1 and "has no deployment" in err
    assert _json(home, "m", "--version", "1", "--replicas", "2")["revision"] == 1
    code, out, _ = _run(home, "m", "--canary", "2", "--percent", "10")
    assert code == 0 and "canary" in out and "10%" in out and "90%" in out
    code, _, err = _run(home, "m", "--promote")
    assert code == 1 and "refused" in err and "accuracy of m:2 is 0.5000" in err
    promoted = _json(home, "m", "--promote", "--force", "--reason", "hotfix")
    assert promoted["stable"] == "2" and promoted["canary"] is None
    _json(home, "m", "--canary", "3", "--percent", "20", "--replicas", "2")
    passed = _json(home, "m", "--promote")
    assert passed["stable"] == "3"
    assert passed["gate"]["passed"] is True  # type: ignore[index]
    back = _json(home, "m", "--rollback")
    assert back["stable"] == "2"
    assert _json(home, "m", "--replicas", "4")["targets"] == [
        {"version": "2", "weight": 100, "replicas": 4}
    ]
    split = _json(home, "m", "--split", "2=70,3=30")
    assert [t["weight"] for t in split["targets"]] == [70, 30]  # type: ignore[attr-defined]
    code, out, err = _run(home, "history", "m", "--json")
    assert code == 0, err
    changes = json.loads(out)
    assert [c["action"] for c in changes] == [
        "set", "canary", "promote", "canary", "promote", "rollback", "scale", "weights",
    ]  # fmt: skip
    assert changes[2]["reason"].startswith("hotfix; gate refused, promoted with --force")
    assert all(c["actor"].startswith("cli:") for c in changes)
    code, out, _ = _run(home, "m", "--history")
    assert code == 0 and "rollback" in out
    code, out, _ = _run(home, "list")
    assert code == 0 and "2=70%x4" in out


def test_usage_errors(home: Path) -> None:
    code, _, err = _run(home, "m", "--version", "1", "--rollback")
    assert code != 0 and "give one of" in err
    code, _, err = _run(home, "m", "--split", "1=a")
    assert code != 0
    code, _, err = _run(home, "m", "--version", "7")
    assert code == 1 and "does not exist" in err
    code, _, err = _run(home, "m", "--promote")
    assert code == 1 and "no deployment" in err


def test_stop_and_deploy_again(home: Path) -> None:
    code, _, err = _run(home, "m", "--stop")
    assert code == 1 and "no deployment" in err
    _json(home, "m", "--version", "1")
    code, out, err = _run(home, "m", "--stop", "--reason", "retired")
    assert code == 0, err
    assert "m stopped (revision 2)" in out and "drain" in out
    code, _, err = _run(home, "m")
    assert code == 1 and "has no deployment" in err
    assert _json(home, "m", "--version", "2")["revision"] == 3
    stopped = _json(home, "m", "--stop")
    assert stopped["action"] == "stop" and stopped["revision"] == 4
    code, _, err = _run(home, "m", "--stop", "--version", "1")
    assert code != 0 and "give one of" in err
    code, out, _ = _run(home, "history", "m", "--json")
    changes = json.loads(out)
    assert [c["action"] for c in changes] == ["set", "stop", "set", "stop"]
    assert changes[1]["reason"] == "retired" and changes[1]["spec"] == {}
