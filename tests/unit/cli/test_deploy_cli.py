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


def test_follow_alias_and_the_alias_moves(home: Path) -> None:
    from lmaas.cli.versions import models_app

    def alias(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(models_app, ["alias", *args, "--home", str(home)])
        return result.exit_code, result.stdout + result.stderr

    code, _, err = _run(home, "m", "--follow-alias", "production")
    assert code == 1 and "no alias 'production'" in err, err
    code, _, err = _run(home, "m", "--follow-alias", "latest")
    assert code == 1 and "cannot follow m@latest" in err
    assert alias("m", "production", "1")[0] == 0
    code, out, err = _run(home, "m", "--follow-alias", "production", "--replicas", "2")
    assert code == 0 and "follows m@production" in out, err
    assert alias("m", "production", "3")[0] == 0
    moved = _json(home, "m")
    assert (moved["stable"], moved["follow"], moved["targets"]) == (
        "3", "production", [{"version": "3", "weight": 100, "replicas": 2}],
    )  # fmt: skip
    _json(home, "m", "--canary", "2", "--percent", "10")
    code, out = alias("m", "production", "1")
    assert code == 1 and "has canary 2 on trial" in out, out
    _json(home, "m", "--rollback")
    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        assert registry.alias_target("m", "production") == "3"  # the refused move undone
    changes = json.loads(_run(home, "history", "m", "--json")[1])
    assert [c["action"] for c in changes] == ["set", "follow", "canary", "rollback"]
    assert changes[1]["reason"] == "m@production moved 1 -> 3"
    assert changes[1]["actor"].startswith("cli:")


def test_wait_without_servers_and_status(home: Path) -> None:
    _json(home, "m", "--version", "1")
    code, _, err = _run(home, "m", "--replicas", "2", "--wait", "--timeout", "1")
    assert code == 0 and "no running server serves m" in err, err
    code, out, err = _run(home, "status", "m")
    assert code == 0 and "revision 2" in out and "no running server" in out, err
    code, _, err = _run(home, "status", "nothing")
    assert code == 1 and "has no deployment" in err


def test_wait_on_published_fleet_rows(home: Path) -> None:
    _json(home, "m", "--version", "1")
    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        store = registry.deployments
        store.publish_fleet(
            "gw-a",
            {
                "*": {"follows": None},
                "m": {"revision": 1, "versions": {"1": {"ready": 0, "replicas": 1}}},
            },
        )
        code, _, err = _run(home, "m", "--wait", "--timeout", "0.6")
        assert code == 2 and "timed out after 0.6 s" in err and "gw-a: revision 1" in err, err
        failed = {"revision": 0, "versions": {}, "failed_revision": 1, "error": "no weights"}
        store.publish_fleet("gw-a", {"*": {"follows": None}, "m": failed})
        code, _, err = _run(home, "m", "--wait")
        assert code == 1 and "could not apply revision 1 of m: gw-a: no weights" in err, err
        ready = {"revision": 1, "versions": {"1": {"ready": 1, "replicas": 1}}}
        store.publish_fleet("gw-a", {"*": {"follows": None}, "m": ready})
        store.publish_fleet("gw-b", {"*": {"follows": ["other"]}})  # does not serve m
        code, out, err = _run(home, "status", "m", "--wait")
        assert code == 0 and "1 server(s) did apply revision 1 of m" in err, err
        assert "gw-a" in out and "gw-b" not in out and "done" in out
        store.publish_fleet("gw-a", {})
        assert [r.gateway for r in store.fleet(60)] == ["gw-b"]
