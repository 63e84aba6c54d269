"""ONNX Runtime plumbing every ONNX runner shares: sessions, datatypes, the graph cache.

Graphs a worker derives at load time (an encoder exported from safetensors, an int8 copy of a
graph) never go into the model's version directory, which is immutable and checksummed. They go
into the worker's cache directory (:func:`cache_dir`): ``WorkerSpec.cache_dir`` (the gateway
sets ``<LMAAS_HOME>/cache/<name>/<version>``), else a per-user folder under the system temp
directory. Each artifact sits in a folder named by a digest of its inputs (the model's files,
the recipe, the library versions), so a stale graph is never reused; it is built by one worker
at a time (a lock file) and written to a temporary name and renamed, so replicas that load at
once never read half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import onnxruntime as ort

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import WorkerSpec

_log = logging.getLogger(__name__)

ORT_TO_V2: dict[str, str] = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16", "tensor(int8)": "INT8", "tensor(int16)": "INT16",
    "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}  # fmt: skip
"""ONNX Runtime element types → Open Inference Protocol v2 datatypes."""

QUANTIZE_CHOICES = ("int8", "int8-dynamic")
"""``int8``: per-token activations, outlier channels in float (:mod:`lmaas.runtimes.onnx_int8`);
``int8-dynamic``: onnxruntime's ``quantize_dynamic`` (one activation scale per tensor)."""


def worker_threads(options: Mapping[str, str]) -> int:
    """Intra-op threads: the ``num_threads`` serving option, else every core this process may
    run on (a worker owns its process). Raises: ModelLoadError when the option is not a number."""
    value = options.get("num_threads")
    if value is not None:
        try:
            return max(1, int(value))
        except ValueError as exc:
            raise ModelLoadError(f"serving option num_threads={value!r} is not an integer") from exc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def open_session(path: Path, num_threads: int) -> ort.InferenceSession:
    """A CPU session on ``path`` with ``num_threads`` intra-op threads.

    Idle pool threads do not spin: the worker's helper threads tokenise and decode between
    forward passes on the same cores. Raises: ModelLoadError when the graph cannot be loaded.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from exc


def quantize_option(options: Mapping[str, str]) -> str | None:
    """The ``quantize`` serving option (``int8``, ``int8-dynamic``) or None.

    Raises: ModelLoadError."""
    value = options.get("quantize", "").strip().lower()
    if value in ("", "none", "fp32"):
        return None
    if value not in QUANTIZE_CHOICES:
        raise ModelLoadError(
            f"serving option quantize={value!r} is not supported; use one of: "
            f"{', '.join(QUANTIZE_CHOICES)}"
        )
    return value


def cache_dir(spec: WorkerSpec) -> Path:
    """Where this worker may write derived graphs (see the module docstring)."""
    if spec.cache_dir:
        return Path(spec.cache_dir)
    user = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"lmaas-cache-{user}"
    return root / spec.model_name / spec.model_version


def source_digest(spec: WorkerSpec, *parts: str) -> str:
    """A short digest of the model's files (as the manifest records them) and ``parts``.

    Without recorded digests (a spec built by hand), the files' paths, sizes and modification
    times stand in for their content.
    """
    digest = hashlib.sha256("\0".join(parts).encode())
    if spec.files:
        for entry in sorted(spec.files, key=lambda f: f.path):
            digest.update(f"{entry.path}\0{entry.sha256}\0".encode())
    else:
        root = Path(spec.model_dir).resolve()
        digest.update(str(root).encode())
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def build_once(dest: Path, build: Callable[[Path], object]) -> Path:
    """Return ``dest``, calling ``build(tmp_path)`` first when it does not exist yet.

    ``build`` writes a complete file at the path it is given; it is then renamed to ``dest``
    (atomic on one file system), so a reader never sees a partial graph. Builders of the same
    ``dest`` (replicas loading at once, in any process) take turns on a lock file beside it:
    the first builds, the others wait and then find the graph (POSIX; elsewhere each builds
    its own copy and the last rename wins).
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.parent / f".{dest.name}.lock"):
        if dest.is_file():
            return dest  # another worker built it while this one waited
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            build(tmp)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return dest


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (released when the file closes, also when
    the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the rename alone keeps readers safe
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
