"""The registry: import, list, resolve, verify and remove model versions.

:class:`RegistryService` ties the on-disk :class:`~lmaas.registry.store.ModelStore` to the
:class:`~lmaas.registry.metadata.MetadataStore`. Files are published before their row is written,
and a failed import removes whatever it had published, so the DB never names a missing version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from pydantic import ValidationError

from lmaas.core.backends import resolve_backend
from lmaas.core.errors import (
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    NotSupportedError,
)
from lmaas.core.hashing import verify_file
from lmaas.core.types import LATEST_ALIAS, ModelFormat, Task, is_valid_name, parse_model_ref
from lmaas.registry.deployments_db import DeploymentStore
from lmaas.registry.lifecycle_db import AliasInTransaction, AliasMove, LifecycleStore, StoredMetric
from lmaas.registry.manifest import (
    FileEntry,
    Lineage,
    Manifest,
    MetricRecord,
    ServingDefaults,
)
from lmaas.registry.metadata import MetadataStore
from lmaas.registry.sources import (
    ImportPlan,
    download_from_hub,
    is_hub_id,
    plan_import,
    sanitize_name,
)
from lmaas.registry.store import ModelStore, copy_and_hash

TRUST_REMOTE_CODE_OPTION = "trust_remote_code"
"""Serving option set to ``"true"`` when the import accepted the model's own Python code."""

_MAX_PUBLISH_ATTEMPTS = 5


class ImportProgress(Protocol):
    """Receives byte counts while an import copies and hashes files (e.g. a progress bar)."""

    def start(self, total_bytes: int, description: str) -> None:
        """Called once before the first byte, with the total to copy."""

    def advance(self, num_bytes: int) -> None:
        """Called after each chunk copied."""

    def finish(self) -> None:
        """Called once at the end, also when the import fails."""


class _NoProgress:
    def start(self, total_bytes: int, description: str) -> None:
        pass

    def advance(self, num_bytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _not_found(name: str, version: str | None) -> ModelNotFoundError:
    ref = name if version is None else f"{name}:{version}"
    return ModelNotFoundError(
        f"model {ref!r} does not exist; `lmaas models list` shows what is imported",
        param="model",
    )


class RegistryService:
    """Model store and metadata DB behind one API.

    Args:
        home: ``LMAAS_HOME``; versions live in ``<home>/models/<name>/<version>/``.
        database_url: SQLAlchemy URL of the metadata DB (migrated on open).
        offline: Never try to reach a model hub.
        hub_endpoint: Base URL of the Hugging Face hub (a mirror); the library default when None.
        alias_audit: Called inside every alias move's transaction, after its history row: the
            audit trail's hook, so a move and its audit row commit together (a hook that raises
            undoes the move). The history table records every move whether or not it is set.
    """

    def __init__(
        self,
        home: Path,
        database_url: str,
        *,
        offline: bool = False,
        hub_endpoint: str | None = None,
        alias_audit: AliasInTransaction | None = None,
    ) -> None:
        self._store = ModelStore(home / "models")
        self._db = MetadataStore(database_url)
        self._lifecycle = LifecycleStore(self._db.sessions)
        self.deployments = DeploymentStore(self._db.sessions)
        """What each served name routes to, and the history of its changes."""
        self._alias_audit = alias_audit
        self._offline = offline
        self._hub_endpoint = hub_endpoint
        self._store.sweep_staging()

    def __enter__(self) -> RegistryService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the DB connections."""
        self._db.close()

    # ------------------------------------------------------------------ import

    def import_model(
        self,
        source: str,
        *,
        name: str | None = None,
        task: Task | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        description: str | None = None,
        serving: dict[str, Any] | None = None,
        lineage: Lineage | None = None,
        metrics: list[MetricRecord] | None = None,
        source_label: str | None = None,
        progress: ImportProgress | None = None,
    ) -> Manifest:
        """Import a model as the next version of ``name``.

        Args:
            source: A local HF-format directory, an ``.onnx`` file, or a hub id ``org/model``.
            name: Model name; derived from the source when None.
            task: The task; inferred from the model's config when None.
            allow_pickle: Accept pickle weights (``.bin``, ``.pt``, ``.pkl``...).
            trust_remote_code: Accept models that need their own Python code (``auto_map``).
            description: Free text stored in the manifest.
            serving: Overrides of :class:`ServingDefaults`.
            lineage: Parent version and transform, for versions made from another one.
            metrics: Measurements taken before the import (a training run's held-out accuracy,
                a compressed version's size and accuracy delta).
            source_label: The manifest's ``source`` when the files were made from another
                version (``digits:1 quantize-int8``); default: the path or hub id.
            progress: Receives byte counts while files are copied and hashed.

        Returns:
            The manifest of the new version.

        Raises:
            InvalidRequestError: Bad name, serving options or source; task not inferable.
            UnsafeModelError: Pickle weights or custom code without the flag.
            OfflineError: A hub id while offline or with the hub unreachable.
        """
        if name is not None and not is_valid_name(name):
            raise _invalid_name(name)
        if lineage is not None and lineage.parent is not None:
            self.resolve(lineage.parent)  # a parent must exist when its child is made
        defaults = _serving_defaults(serving, trust_remote_code)
        opts = _ImportOptions(
            task,
            allow_pickle,
            trust_remote_code,
            description,
            defaults,
            lineage,
            metrics or [],
            source_label,
        )
        return self._import_source(source, name, opts, progress or _NoProgress())

    def _import_source(
        self, source: str, name: str | None, options: _ImportOptions, progress: ImportProgress
    ) -> Manifest:
        path = Path(source).expanduser()
        if path.exists():
            return self._import_local(path, str(path.resolve()), name, options, progress)
        if not is_hub_id(source):
            raise InvalidRequestError(
                f"{source!r} is neither an existing path nor a hub id like 'org/model'",
                param="source",
            )
        return self._import_from_hub(source, name, options, progress)

    def _import_from_hub(
        self, repo_id: str, name: str | None, options: _ImportOptions, progress: ImportProgress
    ) -> Manifest:
        with self._store.staging() as download_dir:
            download_from_hub(
                repo_id,
                download_dir,
                offline=self._offline,
                allow_pickle=options.allow_pickle,
                endpoint=self._hub_endpoint,
            )
            name = name or sanitize_name(repo_id.rsplit("/", 1)[-1])
            return self._import_local(download_dir, f"hf://{repo_id}", name, options, progress)

    def _import_local(
        self,
        path: Path,
        source_label: str,
        name: str | None,
        options: _ImportOptions,
        progress: ImportProgress,
    ) -> Manifest:
        plan = plan_import(
            path,
            task=options.task,
            allow_pickle=options.allow_pickle,
            trust_remote_code=options.trust_remote_code,
        )
        name = name or plan.default_name
        _check_backend(plan.facts.task, plan.format, options.serving)
        with self._store.staging() as stage:
            entries = self._copy(plan, stage, f"importing {name}", progress)
            fields: dict[str, Any] = {
                "name": name,
                "task": plan.facts.task,
                "format": plan.format,
                "architecture": plan.facts.architecture,
                "dtype": plan.facts.dtype,
                "context_length": plan.facts.context_length,
                "labels": plan.facts.labels,
                "files": entries,
                "lineage": options.lineage,
                "metrics": options.metrics,
                "serving": options.serving,
                "source": options.source_label or source_label,
                "description": options.description,
            }
            return self._publish(stage, fields)

    def _copy(
        self, plan: ImportPlan, stage: Path, description: str, progress: ImportProgress
    ) -> list[FileEntry]:
        entries: list[FileEntry] = []
        progress.start(plan.total_bytes, description)
        try:
            for item in plan.files:
                target = (stage / item.relative).resolve()
                if not target.is_relative_to(stage):
                    raise InvalidRequestError(f"source file {item.relative!r} escapes the store")
                copied = copy_and_hash(item.path, target, progress.advance)
                entries.append(FileEntry(**{**copied.model_dump(), "path": item.relative}))
        finally:
            progress.finish()
        return entries

    def _publish(self, stage: Path, fields: dict[str, Any]) -> Manifest:
        name = str(fields["name"])
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            manifest = Manifest(version=self._next_version(name), **fields)
            try:
                self._store.publish(stage, manifest)
            except ConflictError:
                continue  # another import took this version number first
            try:
                self._db.add_version(manifest)
            except ConflictError:
                self._store.unpublish(manifest, stage)  # another gateway's DB row won: retry
                continue
            except BaseException:
                self._store.delete(manifest.name, manifest.version)
                raise
            return manifest
        raise ConflictError(f"could not allocate a version of {name!r}; retry the import")

    def _next_version(self, name: str) -> str:
        versions = [m.version for m in self._db.list_versions(name)]
        versions += self._store.disk_versions(name)
        numbers = [int(v) for v in versions if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    # ------------------------------------------------------------------ queries

    def list_models(self, name: str | None = None) -> list[Manifest]:
        """Return every version of every model (of ``name`` only when given), sorted by name
        then numeric version."""
        return self._db.list_versions(name)

    def get(self, name: str, version: str | None = None) -> Manifest:
        """Return ``name:version``, or the latest version of ``name`` when ``version`` is None.

        Raises:
            ModelNotFoundError: No such model or version (also for names that cannot exist).
        """
        if not is_valid_name(name) or (version is not None and not is_valid_name(version)):
            raise _not_found(name, version)
        if version is None:
            versions = self._db.list_versions(name)
            if not versions:
                raise _not_found(name, None)
            return versions[-1]
        manifest = self._db.get_version(name, version)
        if manifest is None:
            raise _not_found(name, version)
        return manifest

    def resolve(self, ref: str) -> Manifest:
        """Return the version a reference names: ``name`` (latest), ``name:version`` or
        ``name@alias`` (``name@latest`` is the latest version).

        Raises:
            ModelNotFoundError: No such model, version or alias.
        """
        parsed = parse_model_ref(ref)
        if parsed is None:
            raise _not_found(ref, None)
        if parsed.alias is None or parsed.alias == LATEST_ALIAS:
            return self.get(parsed.name, parsed.version)
        version = self._lifecycle.alias_target(parsed.name, parsed.alias)
        if version is None:
            self.get(parsed.name)  # an unknown model says so before an unknown alias
            raise ModelNotFoundError(
                f"model {parsed.name!r} has no alias {parsed.alias!r}; "
                f"`lmaas models show {parsed.name}` lists its aliases",
                param="model",
            )
        return self.get(parsed.name, version)

    def model_dir(self, manifest: Manifest) -> Path:
        """Return the directory holding ``manifest``'s files."""
        return self._store.version_dir(manifest.name, manifest.version)

    def remove(self, name: str, version: str | None = None) -> list[Manifest]:
        """Remove one version, or every version of ``name`` when ``version`` is None.

        Returns:
            The manifests removed.

        Raises:
            ModelNotFoundError: No such model or version.
        """
        if version is None:
            if not is_valid_name(name):
                raise _not_found(name, None)
            removed = self._db.list_versions(name)
            if not removed:
                raise _not_found(name, None)
        else:
            removed = [self.get(name, version)]
        aliases = self._lifecycle.aliases(name)
        held = sorted(
            f"{name}@{a}" for a, v in aliases.items() if v in {m.version for m in removed}
        )
        if held:
            raise ConflictError(
                f"{', '.join(held)} still point(s) at a version being removed; move or remove "
                "the alias first (`lmaas models alias` / `lmaas models unalias`)"
            )
        deployment = self.deployments.get(name)
        deployed = set() if deployment is None else deployment.deployed_versions
        busy = sorted(m.version for m in removed if m.version in deployed)
        if busy:
            raise ConflictError(
                f"the deployment of {name} routes to version(s) {', '.join(busy)}; deploy "
                f"another version first (`lmaas deploy {name} --version V`)"
            )
        for manifest in removed:
            # Row first: a crash in between leaves an orphan directory, never a dangling row.
            self._db.delete_version(manifest.name, manifest.version)
            self._store.delete(manifest.name, manifest.version)
        return removed

    def verify(self, manifest: Manifest) -> None:
        """Re-hash every file of a version against its manifest.

        Raises:
            ChecksumMismatchError: A file is missing, or its size or sha256 differs.
        """
        for entry in manifest.files:
            verify_file(self._store.file_path(manifest, entry.path), entry, manifest.ref)

    # ------------------------------------------------------------------ aliases, tags, metrics

    def set_alias(self, name: str, alias: str, version: str, *, actor: str = "") -> AliasMove:
        """Point ``name@alias`` at ``version`` in one transaction with its history (and audit) row.

        Raises:
            InvalidRequestError: The alias is not a valid name, or is the built-in ``latest``.
            ModelNotFoundError: No such version.
        """
        _check_alias(alias)
        self.get(name, version)
        return self._lifecycle.move_alias(name, alias, version, actor, self._alias_audit)

    def remove_alias(self, name: str, alias: str, *, actor: str = "") -> AliasMove:
        """Remove ``name@alias`` (recorded in the history as a move to no version).

        Raises:
            ModelNotFoundError: No such alias.
        """
        _check_alias(alias)
        return self._lifecycle.move_alias(name, alias, None, actor, self._alias_audit)

    def aliases(self, name: str) -> dict[str, str]:
        """Every alias of ``name`` → version."""
        return self._lifecycle.aliases(name)

    def alias_target(self, name: str, alias: str) -> str | None:
        """The version ``name@alias`` names now, or None (``latest`` included)."""
        if alias == LATEST_ALIAS:
            versions = self._db.list_versions(name)
            return versions[-1].version if versions else None
        return self._lifecycle.alias_target(name, alias)

    def history(self, name: str) -> list[AliasMove]:
        """Every alias move of ``name``, oldest first.

        Raises:
            ModelNotFoundError: No model and no history of that name.
        """
        moves = self._lifecycle.history(name)
        if not moves:
            self.get(name)
        return moves

    def set_tags(self, ref: str, tags: dict[str, str], remove: list[str] | None = None) -> Manifest:
        """Add or replace tags of the version ``ref`` names, and delete the keys in ``remove``.

        Raises:
            InvalidRequestError: A key is not a valid name.
            ModelNotFoundError: No such version.
        """
        bad = [key for key in [*tags, *(remove or [])] if not is_valid_name(key)]
        if bad:
            raise InvalidRequestError(f"invalid tag key {bad[0]!r}", param="tag")
        manifest = self.resolve(ref)
        self._lifecycle.set_tags(manifest.name, manifest.version, tags, remove or [])
        return manifest

    def tags(self, manifest: Manifest) -> dict[str, str]:
        """The tags of one version."""
        return self._lifecycle.tags(manifest.name, manifest.version)

    def add_metrics(self, manifest: Manifest, metrics: list[StoredMetric]) -> None:
        """Store evaluation results on a version (the manifest on disk stays untouched)."""
        self._lifecycle.add_metrics(manifest.name, manifest.version, metrics)

    def metrics(self, manifest: Manifest) -> list[StoredMetric]:
        """Every stored evaluation result of one version, oldest first."""
        return self._lifecycle.metrics(manifest.name, manifest.version)


def _check_alias(alias: str) -> None:
    if alias == LATEST_ALIAS:
        raise InvalidRequestError(
            f"{LATEST_ALIAS!r} is built in (the highest version) and cannot be moved",
            param="alias",
        )
    if not is_valid_name(alias) or alias.isdigit():
        raise InvalidRequestError(
            f"invalid alias {alias!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit, and not only digits (those are versions)",
            param="alias",
        )


@dataclass(frozen=True, slots=True)
class _ImportOptions:
    task: Task | None
    allow_pickle: bool
    trust_remote_code: bool
    description: str | None
    serving: ServingDefaults
    lineage: Lineage | None
    metrics: list[MetricRecord]
    source_label: str | None


def _invalid_name(name: str) -> InvalidRequestError:
    try:
        hint = f"; try {sanitize_name(name)!r}"
    except InvalidRequestError:
        hint = ""
    return InvalidRequestError(
        f"invalid model name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
        f"starting with a letter or digit{hint}",
        param="name",
    )


def _serving_defaults(serving: dict[str, Any] | None, trust_remote_code: bool) -> ServingDefaults:
    try:
        defaults = ServingDefaults.model_validate(serving or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise InvalidRequestError(f"invalid serving option {where}: {err['msg']}") from exc
    options = {k: v for k, v in defaults.options.items() if k != TRUST_REMOTE_CODE_OPTION}
    if trust_remote_code:
        options[TRUST_REMOTE_CODE_OPTION] = "true"
    return defaults.model_copy(update={"options": options})


def _check_backend(task: Task, fmt: ModelFormat, serving: ServingDefaults) -> None:
    """Refuse a ``serving.backend`` (or device) no worker could load this version on; a
    version with its own runner (``serving.options.runner``) chooses for itself.

    Raises:
        InvalidRequestError: naming the backends that do serve it.
    """
    if serving.options.get("runner"):
        return
    try:
        resolve_backend(task.value, fmt.value, serving.backend, serving.device)
    except NotSupportedError as exc:
        where = exc.param or "backend"
        raise InvalidRequestError(
            f"invalid serving option {where}: {exc.message}", param=where
        ) from None
