"""Aliases that move atomically with their history, tags, metrics and name@alias resolution."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from lmaas.core.errors import ConflictError, InvalidRequestError, ModelNotFoundError
from lmaas.core.types import ModelRef, parse_model_ref
from lmaas.registry.lifecycle_db import AliasHistoryRow, AliasMove, StoredMetric
from lmaas.registry.service import RegistryService

MakeModelDir = Callable[..., Path]  # the make_model_dir fixture of conftest.py


def _three_versions(registry: RegistryService, make_model_dir: MakeModelDir) -> None:
    src = make_model_dir()
    for _ in range(3):
        registry.import_model(str(src), name="m")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m", ModelRef("m")),
        ("m:3", ModelRef("m", version="3")),
        ("m@production", ModelRef("m", alias="production")),
        ("m:3@prod", None),
        ("m:", None),
        ("m@", None),
        ("M", None),
        ("../x", None),
        ("m@a/b", None),
    ],
)
def test_parse_model_ref(text: str, expected: ModelRef | None) -> None:
    assert parse_model_ref(text) == expected
    if expected is not None:
        assert str(expected) == text


def test_alias_moves_resolve_and_are_recorded(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    _three_versions(registry, make_model_dir)
    registry.set_alias("m", "production", "1", actor="alice")
    registry.set_alias("m", "staging", "3")
    assert registry.resolve("m@production").version == "1"
    assert registry.resolve("m@staging").version == "3"
    assert registry.resolve("m@latest").version == "3"
    assert registry.resolve("m:2").version == "2"
    move = registry.set_alias("m", "production", "2", actor="bob")
    assert (move.version, move.previous_version, move.actor) == ("2", "1", "bob")
    assert registry.resolve("m@production").version == "2"
    assert registry.aliases("m") == {"production": "2", "staging": "3"}
    registry.remove_alias("m", "staging")
    assert registry.aliases("m") == {"production": "2"}

    history = registry.history("m")
    assert [(h.alias, h.previous_version, h.version) for h in history] == [
        ("production", None, "1"),
        ("staging", None, "3"),
        ("production", "1", "2"),
        ("staging", "3", None),
    ]
    assert history[0].actor == "alice"
    assert all(h.moved_at.tzinfo is not None for h in history)
    assert history == sorted(history, key=lambda h: h.moved_at)


def test_alias_errors(registry: RegistryService, make_model_dir: MakeModelDir) -> None:
    _three_versions(registry, make_model_dir)
    with pytest.raises(ModelNotFoundError, match="m:9"):
        registry.set_alias("m", "production", "9")
    with pytest.raises(ModelNotFoundError):
        registry.set_alias("nope", "production", "1")
    with pytest.raises(InvalidRequestError, match="built in"):
        registry.set_alias("m", "latest", "1")
    for bad in ("Prod", "a b", "12"):
        with pytest.raises(InvalidRequestError, match="invalid alias"):
            registry.set_alias("m", bad, "1")
    with pytest.raises(ModelNotFoundError, match="no alias 'production'"):
        registry.resolve("m@production")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        registry.resolve("nope@production")
    with pytest.raises(ModelNotFoundError):
        registry.remove_alias("m", "production")
    with pytest.raises(ModelNotFoundError):
        registry.history("nope")
    assert registry.history("m") == []  # a failed move leaves no trace


def test_aliased_version_cannot_be_removed(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    _three_versions(registry, make_model_dir)
    registry.set_alias("m", "production", "2")
    with pytest.raises(ConflictError, match="m@production"):
        registry.remove("m", "2")
    with pytest.raises(ConflictError, match="m@production"):
        registry.remove("m")
    registry.remove("m", "3")
    registry.remove_alias("m", "production")
    assert [m.version for m in registry.remove("m")] == ["1", "2"]
    # The history outlives the versions it names.
    assert [h.version for h in registry.history("m")] == ["2", None]


def test_audit_hook_runs_inside_each_moves_transaction(
    home: Path, database_url: str, make_model_dir: MakeModelDir
) -> None:
    seen: list[AliasMove] = []

    def hook(session: Session, move: AliasMove) -> None:
        # The move's history row is already written in the same (uncommitted) transaction.
        (row,) = session.scalars(
            select(AliasHistoryRow).order_by(AliasHistoryRow.id.desc()).limit(1)
        )
        assert (row.alias, row.version) == (move.alias, move.version)
        if move.alias == "refused":
            raise RuntimeError("the audit trail is unreachable")
        seen.append(move)

    with RegistryService(home, database_url, offline=True, alias_audit=hook) as reg:
        _three_versions(reg, make_model_dir)
        reg.set_alias("m", "production", "1", actor="k1")
        with pytest.raises(ModelNotFoundError):
            reg.set_alias("m", "production", "7")
        # A hook that fails undoes the move: no alias, no history row.
        with pytest.raises(RuntimeError, match="unreachable"):
            reg.set_alias("m", "refused", "2")
        assert reg.alias_target("m", "refused") is None
        reg.remove_alias("m", "production")
        assert [(m.alias, m.version, m.actor) for m in seen] == [
            ("production", "1", "k1"),
            ("production", None, ""),
        ]
        assert [(h.alias, h.version) for h in reg.history("m")] == [
            (m.alias, m.version) for m in seen
        ]


def test_concurrent_moves_keep_alias_and_history_consistent(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    _three_versions(registry, make_model_dir)
    errors: list[BaseException] = []

    def mover(version: str) -> None:
        try:
            for _ in range(5):
                registry.set_alias("m", "production", version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(v,)) for v in ("1", "2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    history = registry.history("m")
    assert len(history) == 15
    # Each move's previous version is the version the move before it set: no lost update.
    for before, after in itertools.pairwise(history):
        assert after.previous_version == before.version
    assert registry.aliases("m")["production"] == history[-1].version


def test_tags_and_metrics(registry: RegistryService, make_model_dir: MakeModelDir) -> None:
    _three_versions(registry, make_model_dir)
    registry.set_alias("m", "production", "2")
    registry.set_tags("m@production", {"team": "search", "reviewed": ""})
    registry.set_tags("m:2", {"team": "ranking"}, remove=["reviewed"])
    v2 = registry.get("m", "2")
    assert registry.tags(v2) == {"team": "ranking"}
    assert registry.tags(registry.get("m", "1")) == {}
    with pytest.raises(InvalidRequestError, match="tag key"):
        registry.set_tags("m:2", {"Bad Key": "x"})

    now = datetime.now(UTC)
    registry.add_metrics(
        v2, [StoredMetric("accuracy", 0.5, "a" * 64, "data.jsonl", "test", 4, now)]
    )
    (stored,) = registry.metrics(v2)
    assert (stored.metric, stored.value, stored.split, stored.num_examples) == (
        "accuracy",
        0.5,
        "test",
        4,
    )
    assert registry.metrics(registry.get("m", "1")) == []
    registry.remove_alias("m", "production")
    registry.remove("m", "2")  # tags and metrics go with their version
    registry.import_model(str(make_model_dir()), name="m")
    assert registry.metrics(registry.get("m", "4")) == []
