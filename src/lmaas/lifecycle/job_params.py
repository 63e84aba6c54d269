"""The options of ``lmaas train``, ``lmaas compress`` and ``lmaas convert``, checked once.

Both the CLI (:mod:`lmaas.cli.lifecycle`) and ``POST /admin/jobs`` build one of these models
from what they were given: pydantic checks each option's range, the model's validator the
rules between options (``exactly one of data / sklearn_digits``...), and :meth:`job_args` turns
it into the job program's command line (``python -m lmaas.lifecycle.jobs.<module> ...``).
Torch-free: the CLI and the gateway import it; the job runs in its own process.

:class:`LifecycleJobs` is the gateway's table of these jobs behind ``/admin/jobs``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmaas.core.errors import InvalidRequestError
from lmaas.lifecycle.job_table import Job, JobTable

Epochs = Annotated[int | None, Field(default=None, ge=1, description="Most training epochs.")]
Patience = Annotated[int, Field(default=3, ge=1)]
ValSplit = Annotated[float, Field(default=0.15, ge=0.01, le=0.9)]
TestSplit = Annotated[float, Field(default=0.2, ge=0.0, le=0.9)]
KFold = Annotated[int | None, Field(default=None, ge=2)]
ModelRef = Annotated[str, Field(min_length=1, max_length=200)]


def _flag(name: str, value: object) -> list[str]:
    return [] if value is None else [name, str(value)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: ClassVar[str]
    """The job program: ``lmaas.lifecycle.jobs.<module>``."""

    def job_args(self) -> list[str]:
        raise NotImplementedError

    def paths(self) -> dict[str, Path]:
        """The file or folder options given, by field name (the server checks them)."""
        data = getattr(self, "data", None)
        return {} if data is None else {"data": data}

    def target(self) -> str:
        """What the job makes or transforms, for descriptions and the audit trail."""
        return str(getattr(self, "name", None) or getattr(self, "model", ""))


class TrainImageClassifierParams(_Params):
    """``lmaas train image-classifier``."""

    module: ClassVar[str] = "train"
    name: ModelRef
    data: Path | None = None
    sklearn_digits: bool = False
    epochs: Epochs = None
    patience: Patience = 3
    val_split: ValSplit = 0.15
    test_split: TestSplit = 0.2
    image_size: int = Field(default=8, ge=1)
    patch_size: int | None = Field(default=None, ge=1)
    hidden_size: int = Field(default=128, ge=8)
    layers: int = Field(default=2, ge=1)
    lr: float | None = None
    seed: int = 0
    k_fold: KFold = None

    @model_validator(mode="after")
    def _check(self) -> TrainImageClassifierParams:
        if (self.data is None) == (not self.sklearn_digits):
            raise ValueError("give exactly one of data (a folder) or sklearn_digits")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 (attention heads)")
        if self.image_size % (self.patch_size or self.image_size):
            raise ValueError("image_size must be a multiple of patch_size")
        return self

    def job_args(self) -> list[str]:
        source = ["--sklearn-digits"] if self.sklearn_digits else ["--data", str(self.data)]
        return [
            "image-classifier", *source, "--name", self.name, "--patience", str(self.patience),
            "--val-split", str(self.val_split), "--test-split", str(self.test_split),
            "--image-size", str(self.image_size), "--hidden-size", str(self.hidden_size),
            "--layers", str(self.layers), "--seed", str(self.seed),
            *_flag("--epochs", self.epochs), *_flag("--patch-size", self.patch_size),
            *_flag("--lr", self.lr), *_flag("--k-fold", self.k_fold),
        ]  # fmt: skip


class TrainTextClassifierParams(_Params):
    """``lmaas train text-classifier``."""

    module: ClassVar[str] = "train"
    data: Path
    base: ModelRef
    name: ModelRef
    epochs: Epochs = None
    patience: Patience = 3
    val_split: ValSplit = 0.15
    test_split: TestSplit = 0.2
    lr: float | None = None
    max_length: int = Field(default=128, ge=8)
    seed: int = 0
    k_fold: KFold = None

    def job_args(self) -> list[str]:
        return [
            "text-classifier", "--data", str(self.data), "--base", self.base,
            "--name", self.name, "--patience", str(self.patience),
            "--val-split", str(self.val_split), "--test-split", str(self.test_split),
            "--max-length", str(self.max_length), "--seed", str(self.seed),
            *_flag("--epochs", self.epochs), *_flag("--lr", self.lr),
            *_flag("--k-fold", self.k_fold),
        ]  # fmt: skip


class TrainChatLoraParams(_Params):
    """``lmaas train chat-lora``."""

    module: ClassVar[str] = "train"
    data: Path
    base: ModelRef
    name: ModelRef
    epochs: Epochs = None
    patience: Patience = 3
    val_split: ValSplit = 0.15
    test_split: TestSplit = 0.1
    lr: float | None = None
    batch_size: int = Field(default=4, ge=1)
    max_length: int = Field(default=512, ge=8)
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, ge=0.0)
    dropout: float = Field(default=0.05, ge=0.0, le=0.9)
    target_modules: str = Field(default="all-linear", min_length=1, max_length=500)
    seed: int = 0

    def job_args(self) -> list[str]:
        return [
            "chat-lora", "--data", str(self.data), "--base", self.base, "--name", self.name,
            "--patience", str(self.patience), "--val-split", str(self.val_split),
            "--test-split", str(self.test_split), "--batch-size", str(self.batch_size),
            "--max-length", str(self.max_length), "--rank", str(self.rank),
            "--alpha", str(self.alpha), "--dropout", str(self.dropout),
            "--target-modules", self.target_modules, "--seed", str(self.seed),
            *_flag("--epochs", self.epochs), *_flag("--lr", self.lr),
        ]  # fmt: skip


def _data_flags(data: Path | None, sklearn_digits: bool) -> list[str]:
    if sklearn_digits:
        return ["--sklearn-digits"]
    return [] if data is None else ["--data", str(data)]


class CompressParams(_Params):
    """``lmaas compress``."""

    module: ClassVar[str] = "compress"
    model: ModelRef
    int8: bool = False
    prune: float | None = Field(default=None, ge=0.0, le=1.0)
    all_layers: bool = False
    name: str | None = Field(default=None, min_length=1, max_length=200)
    data: Path | None = None
    sklearn_digits: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompressParams:
        if self.int8 == (self.prune is not None):
            raise ValueError("give exactly one of int8 or prune (a sparsity)")
        if self.all_layers and not self.int8:
            raise ValueError("all_layers goes with int8")
        if self.data is not None and self.sklearn_digits:
            raise ValueError("give at most one of data or sklearn_digits")
        return self

    def job_args(self) -> list[str]:
        args = [self.model, *(["--int8"] if self.int8 else ["--prune", str(self.prune)])]
        args += _flag("--name", self.name) + (["--all-layers"] if self.all_layers else [])
        return args + _data_flags(self.data, self.sklearn_digits)


class ConvertParams(_Params):
    """``lmaas convert``."""

    module: ClassVar[str] = "convert"
    model: ModelRef
    onnx: bool = False
    name: str | None = Field(default=None, min_length=1, max_length=200)
    max_abs_diff: float = Field(default=1e-4, ge=0.0)
    min_top1_agreement: float = Field(default=1.0, ge=0.0, le=1.0)
    samples: int = Field(default=64, ge=1)
    data: Path | None = None
    sklearn_digits: bool = False

    @model_validator(mode="after")
    def _check(self) -> ConvertParams:
        if not self.onnx:
            raise ValueError("choose a target format: onnx")
        if self.data is not None and self.sklearn_digits:
            raise ValueError("give at most one of data or sklearn_digits")
        return self

    def job_args(self) -> list[str]:
        return [
            self.model, "--onnx", *_flag("--name", self.name),
            "--max-abs-diff", repr(self.max_abs_diff),
            "--min-top1-agreement", repr(self.min_top1_agreement), "--samples", str(self.samples),
            *_data_flags(self.data, self.sklearn_digits),
        ]  # fmt: skip


JobKind = Literal[
    "train-image-classifier", "train-text-classifier", "train-chat-lora", "compress", "convert"
]
PARAMS: dict[str, type[_Params]] = {
    "train-image-classifier": TrainImageClassifierParams,
    "train-text-classifier": TrainTextClassifierParams,
    "train-chat-lora": TrainChatLoraParams,
    "compress": CompressParams,
    "convert": ConvertParams,
}
"""Each job kind's options (the CLI command's, by their Python names)."""

JobParams = _Params


def parse_params(kind: str, params: dict[str, Any]) -> _Params:
    """``params`` checked as the options of ``kind``.

    Raises:
        InvalidRequestError: an unknown kind, or an option that does not pass (its name is the
            error's ``param``: ``params.epochs``).
    """
    model = PARAMS.get(kind)
    if model is None:
        raise InvalidRequestError(
            f"kind must be one of {', '.join(PARAMS)}, not {kind!r}", param="kind"
        )
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        param = f"params.{where}" if where else "params"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidRequestError(f"{param}: {message}", param=param) from exc


def validation_message(exc: ValidationError, model: type[BaseModel]) -> str:
    """The failing options in the CLI's words (``val_split`` → ``--val-split``)."""

    def flags(text: str) -> str:
        for name in model.model_fields:
            text = re.sub(rf"(?<![-\w]){name}(?![-\w])", "--" + name.replace("_", "-"), text)
        return text

    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(flags(f"{where}: {message}" if where else message))
    return "; ".join(lines)


@dataclass(frozen=True, slots=True)
class LifecycleJobSpec:
    """A lifecycle job: its kind, options and the registry it writes to."""

    kind: str
    params: _Params
    home: Path
    database_url: str

    def argv(self) -> list[str]:
        """The subprocess command line (what ``lmaas train/compress/convert`` runs)."""
        return [
            sys.executable, "-m", f"lmaas.lifecycle.jobs.{self.params.module}",
            *self.params.job_args(), "--home", str(self.home),
            "--database-url", self.database_url,
        ]  # fmt: skip


LifecycleJob = Job[LifecycleJobSpec]


class LifecycleJobs(JobTable[LifecycleJobSpec]):
    """Training, compression and conversion jobs behind ``/admin/jobs`` (one at a time; they
    share the :class:`JobTable` machinery with the evaluations, not its queue)."""

    def __init__(self, home: Path, database_url: str) -> None:
        super().__init__("job", "job")
        self._home, self._database_url = home, database_url

    def submit(self, kind: str, params: _Params, *, actor: str | None = None) -> LifecycleJob:
        """Queue a job (call in the loop)."""
        spec = LifecycleJobSpec(kind, params, self._home, self._database_url)
        return self._submit(spec, actor=actor)
