"""Key format, hashing, scopes, model globs and durations (pure functions, no DB)."""

from __future__ import annotations

import ast
import hashlib
import inspect
from datetime import timedelta

import pytest

from lmaas.core.errors import InvalidRequestError
from lmaas.gateway import keys
from lmaas.gateway.keys import (
    Principal,
    Scope,
    check_model_patterns,
    hash_key,
    key_matches,
    new_key_id,
    new_secret_key,
    normalize_key_id,
    parse_duration,
    parse_key_id,
    parse_scopes,
)


def test_a_new_key_has_a_visible_id_and_a_high_entropy_secret() -> None:
    key_id = new_key_id()
    secret = new_secret_key(key_id)
    assert secret.startswith(f"lmaas-{key_id}-")
    assert len(key_id) == 12 and int(key_id, 16) >= 0
    assert len(secret.split("-", 2)[2]) >= 43  # 32 random bytes, url-safe base64
    assert parse_key_id(secret) == key_id
    assert len({new_secret_key(key_id) for _ in range(100)}) == 100


def test_the_hash_is_sha256_of_the_whole_key_and_matches_exactly() -> None:
    secret = new_secret_key(new_key_id())
    stored = hash_key(secret)
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    assert key_matches(secret, stored)
    assert not key_matches(secret.upper(), stored)  # no case folding
    assert not key_matches(secret[:-1], stored)
    assert not key_matches(secret + " ", stored)


def test_the_comparison_is_constant_time() -> None:
    tree = ast.parse(inspect.getsource(keys.key_matches))
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    assert not any(isinstance(n, ast.Compare) for n in ast.walk(tree))


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "sk-1234",
        "lmaas-ABCDEF123456-" + "a" * 43,  # upper-case id
        "lmaas-abc-" + "a" * 43,
        "LMAAS-abcdef123456-" + "a" * 43,
        "lmaas-abcdef123456-" + "a" * 5,
        "lmaas-abcdef123456-" + "a" * 300,
        "lmaas-abcdef123456-" + "a" * 42 + "\n",
        "lmaas-abcdef123456-" + "é" * 43,
    ],
)
def test_malformed_keys_have_no_id(presented: str) -> None:
    assert parse_key_id(presented) is None


def test_key_ids_are_accepted_with_or_without_the_prefix() -> None:
    assert normalize_key_id("abcdef123456") == "abcdef123456"
    assert normalize_key_id("lmaas-abcdef123456") == "abcdef123456"
    with pytest.raises(InvalidRequestError, match="not a key id"):
        normalize_key_id("../etc/passwd")


def test_scopes_and_model_patterns_are_checked() -> None:
    assert parse_scopes(["inference", "models:read"]) == {Scope.INFERENCE, Scope.MODELS_READ}
    with pytest.raises(InvalidRequestError, match="unknown scope 'root'"):
        parse_scopes(["root"])
    with pytest.raises(InvalidRequestError, match="at least one scope"):
        parse_scopes([])
    assert check_model_patterns(["a*", "b", "a*"]) == ("a*", "b")
    for bad in ([], ["A B"], ["x/../y"], ["*" * 65]):
        with pytest.raises(InvalidRequestError):
            check_model_patterns(bad)


def test_a_principal_sees_models_by_case_sensitive_glob() -> None:
    scoped = Principal("k", "t", frozenset({Scope.INFERENCE}), ("tiny-*", "exact"))
    assert scoped.may_see("tiny-chat") and scoped.may_see("exact")
    assert not scoped.may_see("Tiny-chat") and not scoped.may_see("exact2")
    assert not scoped.sees_every_model and scoped.may_infer and not scoped.is_admin
    reader = Principal("k", "t", frozenset({Scope.MODELS_READ}))
    assert reader.sees_every_model and not reader.may_infer
    admin = Principal("k", "t", frozenset({Scope.ADMIN}), ("none",))
    assert admin.may_see("anything") and admin.may_infer


def test_durations() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("0d", "-1d", "1y", "d", "1.5h"):
        with pytest.raises(InvalidRequestError, match="invalid duration"):
            parse_duration(bad)
