"""API keys: their format, hashing and scopes, and the principal a key authenticates as.

A key reads ``lmaas-<id>-<secret>``: ``lmaas-<id>`` is its visible prefix (safe in logs, tables
and audit rows), ``<id>`` is 12 hex digits that find the row, ``<secret>`` is 32 random bytes
(``secrets.token_urlsafe``, 256 bits). The DB keeps only ``sha256(key)``.

Why a fast hash is right here: slow password hashes (bcrypt, scrypt, argon2) exist to make
guessing *low-entropy* human passwords expensive after a DB leak. A 256-bit random secret cannot
be guessed at any hash speed, so a slow hash would only add milliseconds to every request. The
comparison after the lookup by id is constant-time (:func:`hmac.compare_digest`), with no case
folding, no trimming and no prefix-dependent branches.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from fnmatch import fnmatchcase

from lmaas.core.errors import InvalidRequestError
from lmaas.gateway.limits import NO_LIMITS, Limits

KEY_PREFIX = "lmaas"
KEY_ID_HEX_DIGITS = 12
SECRET_NUM_BYTES = 32
MAX_KEY_CHARS = 256
"""Longer presented keys are refused before they are hashed."""

_KEY_RE = re.compile(rf"^{KEY_PREFIX}-([0-9a-f]{{{KEY_ID_HEX_DIGITS}}})-([A-Za-z0-9_-]{{16,128}})$")
_KEY_ID_RE = re.compile(rf"^(?:{KEY_PREFIX}-)?([0-9a-f]{{{KEY_ID_HEX_DIGITS}}})$")
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_MODEL_PATTERNS = 64
_MODEL_PATTERN_RE = re.compile(r"^[a-z0-9*?\[\]!._-]{1,64}$")


class Scope(enum.StrEnum):
    """What a key may do. ``admin`` implies the others, on every model."""

    ADMIN = "admin"
    MODELS_READ = "models:read"
    """List and describe the models the key may see."""
    INFERENCE = "inference"
    """Call the models the key may see (and list them)."""


def new_key_id() -> str:
    """A fresh random key id (12 hex digits)."""
    return secrets.token_hex(KEY_ID_HEX_DIGITS // 2)


def new_secret_key(key_id: str) -> str:
    """A new full key for ``key_id``: ``lmaas-<id>-<43 url-safe chars>``."""
    return f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(SECRET_NUM_BYTES)}"


def key_prefix(key_id: str) -> str:
    """The visible part of a key, for logs and tables: ``lmaas-<id>``."""
    return f"{KEY_PREFIX}-{key_id}"


def hash_key(key: str) -> str:
    """SHA-256 hex digest of the whole key (see the module docstring for why SHA-256)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_matches(key: str, stored_hash: str) -> bool:
    """Constant-time check of a presented key against its stored hash."""
    return hmac.compare_digest(hash_key(key).encode("ascii"), stored_hash.encode("ascii"))


def parse_key_id(key: str) -> str | None:
    """The id inside a well-formed key, or None (the caller answers 401, not 400)."""
    if len(key) > MAX_KEY_CHARS:
        return None
    match = _KEY_RE.fullmatch(key)
    return match.group(1) if match else None


def normalize_key_id(value: str) -> str:
    """Accept a key id as ``<id>`` or ``lmaas-<id>`` (how tables and logs show it).

    Raises:
        InvalidRequestError: not a key id.
    """
    match = _KEY_ID_RE.fullmatch(value.strip())
    if match is None:
        raise InvalidRequestError(
            f"not a key id: {value[:40]!r} (expected {KEY_ID_HEX_DIGITS} hex digits, "
            f"optionally prefixed with '{KEY_PREFIX}-')",
            param="id",
        )
    return match.group(1)


def parse_scopes(values: list[str]) -> frozenset[Scope]:
    """Scopes from their names; at least one.

    Raises:
        InvalidRequestError: an unknown scope, or none.
    """
    if not values:
        raise InvalidRequestError("a key needs at least one scope", param="scopes")
    scopes = set()
    for value in values:
        try:
            scopes.add(Scope(value))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise InvalidRequestError(
                f"unknown scope {value!r} (known: {known})", param="scopes"
            ) from None
    return frozenset(scopes)


def check_model_patterns(patterns: list[str]) -> tuple[str, ...]:
    """Model names or globs (``*``, ``?``, ``[..]``, as :func:`fnmatch.fnmatchcase`); at least one.

    Raises:
        InvalidRequestError: an empty list, too many, or a pattern with other characters.
    """
    if not patterns:
        raise InvalidRequestError(
            "a key needs at least one model pattern ('*': all)", param="models"
        )
    if len(patterns) > MAX_MODEL_PATTERNS:
        raise InvalidRequestError(f"at most {MAX_MODEL_PATTERNS} model patterns", param="models")
    for pattern in patterns:
        if not _MODEL_PATTERN_RE.fullmatch(pattern):
            raise InvalidRequestError(
                f"invalid model pattern {pattern[:70]!r}: use model names and the globs * ? [..]",
                param="models",
            )
    return tuple(dict.fromkeys(patterns))


def parse_duration(value: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` as a positive timedelta.

    Raises:
        InvalidRequestError: another shape, or zero.
    """
    match = _DURATION_RE.fullmatch(value)
    if match is None or int(match.group(1)) == 0:
        raise InvalidRequestError(
            f"invalid duration {value[:40]!r}: use a positive number and s, m, h, d or w "
            "(e.g. 30d)",
            param="expires_in",
        )
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS_S[match.group(2)])


@dataclass(slots=True, frozen=True)
class Principal:
    """Who a request runs as, once its key checked out; the API puts it on ``request.state``.

    Args:
        key_id: The key's id (its visible prefix is ``lmaas-<key_id>``).
        tenant: The tenant the key belongs to (metering and limits key on it).
        scopes: What the key may do.
        models: Names or globs of the models the key may see and call.
        key_limits: Rate limits of the key.
        tenant_limits: Rate limits of its tenant (shared by all the tenant's keys).
        tenant_weight: The tenant's fair-share weight in the engine queues.
    """

    key_id: str
    tenant: str
    scopes: frozenset[Scope]
    models: tuple[str, ...] = ("*",)
    key_limits: Limits = NO_LIMITS
    tenant_limits: Limits = NO_LIMITS
    tenant_weight: float = 1.0

    @property
    def is_limited(self) -> bool:
        return self.key_limits.any or self.tenant_limits.any

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    @property
    def sees_every_model(self) -> bool:
        """True for admins and ``*`` keys: the model filter can be skipped."""
        return self.is_admin or "*" in self.models

    @property
    def may_infer(self) -> bool:
        return self.is_admin or Scope.INFERENCE in self.scopes

    def may_see(self, model: str) -> bool:
        """True when ``model`` matches one of the key's patterns (case-sensitive)."""
        return self.sees_every_model or any(fnmatchcase(model, p) for p in self.models)
