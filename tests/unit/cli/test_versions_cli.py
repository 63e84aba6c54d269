"""``lmaas models alias / unalias / tag / history / show / compare`` and import lineage."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from typer.testing import CliRunner

from lmaas.bootstrap.settings import Settings
from lmaas.cli.governance import cli_actor
from lmaas.cli.versions import models_app
from lmaas.gateway.service import GovernanceService
from lmaas.registry.lifecycle_db import StoredMetric
from lmaas.registry.service import RegistryService


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("LMAAS_HOME", "LMAAS_DATABASE_URL", "LMAAS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


@pytest.fixture
def three_versions(tmp_path: Path, home: Path) -> Path:
    src = tmp_path / "m"
    src.mkdir()
    config = {"architectures": ["BertModel"], "model_type": "bert", "max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(src / "model.safetensors"))
    for _ in range(2):
        assert _run(home, "import", str(src), "--name", "m")[0] == 0
    code, _out, err = _run(
        home,
        "import",
        str(src),
        "--name",
        "m",
        "--parent",
        "m:1",
        "--transform",
        "quantize-int8",
        "--param",
        "bits=8",
    )
    assert code == 0, err
    return src


def _run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(models_app, [*args, "--home", str(home)])
    return result.exit_code, result.stdout, result.stderr


def _at(alias: str, version: str) -> dict[str, str]:
    return {"model": "m", "alias": alias, "version": version}


def test_alias_history_show(home: Path, three_versions: Path) -> None:
    assert _run(home, "alias", "m", "production", "1")[1] == "m@production -> m:1\n"
    assert _run(home, "alias", "m", "production", "2")[1] == "m@production -> m:2 (was 1)\n"
    assert _run(home, "alias", "m", "staging", "3")[0] == 0
    assert _run(home, "unalias", "m", "staging")[1] == "removed m@staging (was 3)\n"

    code, out, _ = _run(home, "history", "m")
    assert code == 0
    assert "production" in out and "(removed)" in out and "quantize-int8" in out
    moves = json.loads(_run(home, "history", "m", "--json")[1])
    assert [(m["alias"], m["previous_version"], m["version"], m["actor"]) for m in moves] == [
        ("production", None, "1", cli_actor()),
        ("production", "1", "2", cli_actor()),
        ("staging", None, "3", cli_actor()),
        ("staging", "3", None, cli_actor()),
    ]
    # ... and each move is in the hash-chained audit trail, with who, before and after
    service = GovernanceService.open(f"sqlite:///{home / 'lmaas.db'}")
    try:
        rows = service.list_audit(limit=10, after_seq=0)
        assert service.verify_audit().ok
    finally:
        service.close()
    assert [(r.actor, r.action, r.target, r.before, r.after) for r in rows] == [
        (cli_actor(), "alias.move", "m@production", None, _at("production", "1")),
        (cli_actor(), "alias.move", "m@production", _at("production", "1"), _at("production", "2")),
        (cli_actor(), "alias.move", "m@staging", None, _at("staging", "3")),
        (cli_actor(), "alias.remove", "m@staging", _at("staging", "3"), None),
    ]

    shown = yaml.safe_load(_run(home, "show", "m@production")[1])
    assert shown["version"] == "2"
    assert shown["registry"]["aliases"] == ["production"]
    lineage = yaml.safe_load(_run(home, "show", "m:3", "--manifest-only")[1])["lineage"]
    assert lineage == {"parent": "m:1", "transform": "quantize-int8", "parameters": {"bits": "8"}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("alias", "m", "production", "9"), "'m:9' does not exist"),
        (("alias", "m", "latest", "1"), "built in"),
        (("alias", "m", "Prod", "1"), "invalid alias"),
        (("unalias", "m", "production"), "alias m@production does not exist"),
        (("show", "m@production"), "no alias 'production'"),
        (("history", "ghost"), "'ghost' does not exist"),
        (("tag", "m:1", "Bad Key=1"), "invalid tag key"),
        (("compare", "m:1", "m:7"), "does not exist"),
    ],
)
def test_errors_are_one_red_line(
    home: Path, three_versions: Path, args: tuple[str, ...], message: str
) -> None:
    code, _, err = _run(home, *args)
    assert code == 1
    assert message in err and "Traceback" not in err


def test_lineage_flags_are_checked(home: Path, three_versions: Path) -> None:
    src = str(three_versions)
    code, _, err = _run(home, "import", src, "--parent", "ghost:1")
    assert code == 1 and "'ghost:1' does not exist" in err
    code, _, err = _run(home, "import", src, "--transform", "x")
    assert code == 2 and "--parent" in err
    code, _, err = _run(home, "import", src, "--parent", "nocolon")
    assert code == 2 and "name:version" in err


def test_tags_and_compare(home: Path, three_versions: Path) -> None:
    assert _run(home, "tag", "m:2", "team=search", "reviewed=")[1] == "m:2: reviewed team=search\n"
    assert _run(home, "tag", "m:2", "--remove", "reviewed")[1] == "m:2: team=search\n"
    assert yaml.safe_load(_run(home, "show", "m:2")[1])["registry"]["tags"] == {"team": "search"}

    out = _run(home, "compare", "m:1", "m:2")[1]
    assert "has stored metrics; run `lmaas eval`" in out
    settings = Settings(home=home)
    with RegistryService(home, settings.resolved_database_url()) as registry:
        now = datetime.now(UTC)
        for version, value in (("1", 0.5), ("2", 0.75)):
            metric = StoredMetric("accuracy", value, "d" * 64, "data.jsonl", "test", 8, now)
            registry.add_metrics(registry.get("m", version), [metric])
    code, out, _ = _run(home, "compare", "m:1", "m:2")
    assert code == 0
    row = next(line for line in out.splitlines() if "accuracy" in line)
    assert "0.5000" in row and "0.7500" in row and "+0.2500" in row
    metrics = yaml.safe_load(_run(home, "show", "m:2")[1])["registry"]["metrics"]
    assert [(m["metric"], m["value"], m["split"]) for m in metrics] == [("accuracy", 0.75, "test")]
