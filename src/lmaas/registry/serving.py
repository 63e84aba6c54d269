"""The worker spec of a version: how the manifest's serving defaults reach a runner.

One function for the server (``bootstrap.wiring.deployment_for``) and for offline jobs
(``lifecycle.evaluate``), so an evaluation runs the model exactly as a worker would.
"""

from __future__ import annotations

from pathlib import Path

from lmaas.core.messages import WorkerSpec
from lmaas.registry.manifest import Manifest


def worker_spec_for(
    manifest: Manifest, model_dir: Path, *, dtype: str, device: str, cache_dir: Path
) -> WorkerSpec:
    """Build the spec a runner loads ``manifest`` from (IPC endpoints left empty).

    Args:
        manifest: The version.
        model_dir: Its directory in the store.
        dtype: Used when the manifest's ``serving.dtype`` is ``auto``.
        device: Used when the manifest's ``serving.device`` is ``auto``.
        cache_dir: Where the runtime may cache derived artifacts (ONNX exports...).
    """
    serving = manifest.serving
    options = dict(serving.options)
    if serving.kv_cache_bytes is not None and "kv_cache_bytes" not in options:
        options["kv_cache_bytes"] = str(serving.kv_cache_bytes)
    if serving.matryoshka_dims:
        options["matryoshka_dims"] = ",".join(str(d) for d in serving.matryoshka_dims)
    if serving.backend != "auto":
        options.setdefault("backend", serving.backend)
    return WorkerSpec(
        model_name=manifest.name,
        model_version=manifest.version,
        task=manifest.task.value,
        format=manifest.format.value,
        model_dir=str(model_dir),
        files=manifest.file_digests(),
        requests_endpoint="",
        results_endpoint="",
        dtype=serving.dtype if serving.dtype != "auto" else dtype,
        device=serving.device if serving.device != "auto" else device,
        context_length=serving.max_context or manifest.context_length,
        max_batch_size=serving.max_batch_size,
        options=options,
        cache_dir=str(cache_dir),
    )
