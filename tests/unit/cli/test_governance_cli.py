"""``lmaas tenants`` and ``lmaas keys`` on a home's DB directly (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmaas.cli.main import app
from lmaas.core.errors import AuthenticationError
from lmaas.gateway.service import GovernanceService


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("LMAAS_HOME", "LMAAS_DATABASE_URL", "LMAAS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def _run(home: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, [*args, "--home", str(home)], input=stdin, env={"COLUMNS": "160"}
    )
    return result.exit_code, result.stdout, result.stderr


def _authenticate(home: Path, secret: str) -> str:
    service = GovernanceService.open(f"sqlite:///{home / 'lmaas.db'}")
    try:
        return service.authenticate_sync(secret).key_id
    finally:
        service.close()


def test_tenants_create_list_show_rm(home: Path) -> None:
    assert _run(home, "tenants", "create", "team-a", "--description", "search team")[0] == 0
    code, _, err = _run(home, "tenants", "create", "team-a")
    assert code == 1 and "tenant 'team-a' already exists" in err
    code, out, _ = _run(home, "tenants", "list")
    assert code == 0 and "team-a" in out and "search team" in out
    code, out, _ = _run(home, "tenants", "show", "team-a", "--json")
    assert json.loads(out)["keys"] == []
    code, _, err = _run(home, "tenants", "show", "ghost")
    assert code == 1 and "tenant 'ghost' does not exist" in err
    assert _run(home, "tenants", "rm", "team-a", stdin="n\n")[0] == 1  # declined
    code, out, _ = _run(home, "tenants", "rm", "team-a", "--yes")
    assert code == 0 and "deleted tenant team-a" in out
    assert "team-a" not in _run(home, "tenants", "list")[1]


def test_keys_create_list_show_rotate_revoke(home: Path) -> None:
    _run(home, "tenants", "create", "team-a")
    code, out, err = _run(
        home, "keys", "create", "--tenant", "team-a", "--scope", "inference",
        "--models", "tiny-*,demo-chat", "--expires-in", "30d", "--name", "ci",
    )  # fmt: skip
    assert code == 0, err
    secret = out.strip()
    assert "shown once" in err and secret not in err
    key_id = _authenticate(home, secret)
    code, out, _ = _run(home, "keys", "list", "--json")
    [listed] = json.loads(out)
    assert listed["id"] == key_id and listed["models"] == ["tiny-*", "demo-chat"]
    assert listed["expires_at"] is not None and "secret" not in listed and secret not in out
    code, out, _ = _run(home, "keys", "list")
    assert f"lmaas-{key_id}" in out and "inference" in out
    code, out, _ = _run(home, "keys", "show", f"lmaas-{key_id}")
    assert json.loads(out)["status"] == "active"

    code, out, err = _run(home, "keys", "rotate", key_id)
    assert code == 0, err
    rotated = out.strip()
    assert rotated != secret and _authenticate(home, rotated) == key_id
    with pytest.raises(AuthenticationError):
        _authenticate(home, secret)
    code, out, _ = _run(home, "keys", "revoke", key_id)
    assert code == 0 and f"revoked lmaas-{key_id}" in out
    with pytest.raises(AuthenticationError, match="revoked"):
        _authenticate(home, rotated)
    assert json.loads(_run(home, "keys", "show", key_id)[1])["status"] == "revoked"


def test_key_errors_are_one_clear_line(home: Path) -> None:
    _run(home, "tenants", "create", "team-a")
    cases = [
        (["--tenant", "ghost", "--scope", "inference"], "tenant 'ghost' does not exist"),
        (["--tenant", "team-a", "--scope", "root"], "unknown scope 'root'"),
        (["--tenant", "team-a", "--scope", "inference", "--expires-in", "1y"], "invalid duration"),
    ]
    for args, message in cases:
        code, out, err = _run(home, "keys", "create", *args)
        assert code == 1 and message in err and out == ""
    code, _, err = _run(home, "keys", "revoke", "nope")
    assert code == 1 and "not a key id" in err


def test_limits_on_tenants_and_keys(home: Path) -> None:
    code, _, err = _run(
        home, "tenants", "create", "team-a", "--rpm", "100", "--max-concurrent", "8"
    )
    assert code == 0, err
    code, out, err = _run(
        home, "keys", "create", "--tenant", "team-a", "--scope", "inference", "--tpm", "5000"
    )
    assert code == 0, err
    key_id = _authenticate(home, out.strip())
    assert "5000 tpm" in _run(home, "keys", "list")[1]
    code, out, _ = _run(home, "keys", "limits", key_id, "--rpm", "10", "--tpm", "0")
    assert code == 0 and out.strip() == f"lmaas-{key_id}: 10 rpm"
    limits = json.loads(_run(home, "keys", "show", key_id)[1])["limits"]
    assert limits == {"rpm": 10, "tpm": None, "max_concurrent": None, "quotas": []}
    code, out, _ = _run(home, "tenants", "limits", "team-a", "--max-concurrent", "0")
    assert out.strip() == "tenant team-a: 100 rpm"
    assert "100 rpm" in _run(home, "tenants", "list")[1]
    code, _, err = _run(home, "keys", "limits", key_id, "--rpm", "-5")
    assert code == 1 and "positive integer" in err


def test_quotas_on_tenants_and_keys(home: Path) -> None:
    code, _, err = _run(
        home, "tenants", "create", "team-q", "--quota-requests", "1000/day", "--rpm", "60"
    )
    assert code == 0, err
    code, out, err = _run(
        home,
        "keys",
        "create",
        "--tenant",
        "team-q",
        "--scope",
        "inference",
        "--quota-tokens",
        "1000000/month",
        "--quota-tokens",
        "50000/day",
        "--quota-images",
        "200/day",
    )
    assert code == 0, err
    key_id = _authenticate(home, out.strip())
    listed = _run(home, "keys", "list")[1]
    assert "1000000 tokens/month" in listed
    code, out, _ = _run(
        home, "keys", "limits", key_id, "--quota-tokens", "0", "--quota-audio-seconds", "3600/month"
    )
    assert code == 0 and out.strip() == f"lmaas-{key_id}: 3600 audio s/month, 200 images/day"
    quotas = json.loads(_run(home, "keys", "show", key_id)[1])["limits"]["quotas"]
    assert quotas == [
        {"metric": "audio_seconds", "limit": 3600.0, "period": "month"},
        {"metric": "images", "limit": 200.0, "period": "day"},
    ]
    assert "1000 requests/day" in _run(home, "tenants", "list")[1]
    tenant = json.loads(_run(home, "tenants", "show", "team-q", "--json")[1])
    assert tenant["limits"]["quotas"] == [{"metric": "requests", "limit": 1000.0, "period": "day"}]
    code, _, err = _run(home, "tenants", "limits", "team-q", "--quota-requests", "10/week")
    assert code == 1 and "use day or month" in err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LMAAS_REDIS_URL": "http://cache:6379"}, "bad setting LMAAS_REDIS_URL: "),
        ({"LMAAS_LIMITS__BACKEND": "etcd"}, "bad setting LMAAS_LIMITS__BACKEND: "),
    ],
)
def test_serve_names_a_bad_setting_without_a_traceback(
    home: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["serve", "--home", str(home)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not home.exists()  # refused before anything was created


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "list"],
        ["models", "list"],
        ["usage"],
        ["audit", "verify"],
        ["deploy", "list"],
        ["eval", "m:1", "--data", "d.jsonl"],
        ["compress", "m:1", "--int8"],
    ],
)
def test_every_command_names_a_bad_setting_the_same_way(
    home: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("LMAAS_LIMITS__BACKEND", "etcd")
    result = CliRunner().invoke(app, [*command, "--home", str(home)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "bad setting LMAAS_LIMITS__BACKEND: " in result.stderr
    assert "Traceback" not in result.stderr
