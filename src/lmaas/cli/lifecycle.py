"""``lmaas train``, ``lmaas compress`` and ``lmaas convert``: lifecycle jobs in a child process.

Each command checks its arguments (with the rules of ``POST /admin/jobs``:
:mod:`lmaas.lifecycle.job_params`), then runs the job module (``lmaas.lifecycle.jobs.*``) as
``python -m ...`` with the home and database of the current settings, in the foreground: the job
draws its own progress bar and log on this terminal. The CLI never imports torch (import-linter
keeps ``lmaas.cli`` free of it); the job does, in its own process.

Ctrl-C reaches the job (the terminal signals the whole foreground process group); this process
ignores it while it waits, so the job can stop training, delete its temporary files and exit
with 130 without ever leaving a half-registered version.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from lmaas.cli.common import load_settings
from lmaas.lifecycle.job_params import (
    CompressParams,
    ConvertParams,
    JobParams,
    TrainChatLoraParams,
    TrainImageClassifierParams,
    TrainTextClassifierParams,
    validation_message,
)

train_app = typer.Typer(
    help="Train a model on labelled data and register it as a new version.",
    no_args_is_help=True,
)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="lmaas home directory (default: $LMAAS_HOME or ~/.lmaas)."),
]
NameOption = Annotated[str, typer.Option("--name", help="Model name to register the result as.")]
EpochsOption = Annotated[int | None, typer.Option(min=1, help="Most training epochs.")]
PatienceOption = Annotated[
    int, typer.Option(min=1, help="Stop after this many epochs without a better validation score.")
]
ValSplitOption = Annotated[
    float, typer.Option(min=0.01, max=0.9, help="Fraction held out for early stopping.")
]
TestSplitOption = Annotated[
    float, typer.Option(min=0.0, max=0.9, help="Fraction held out for the reported accuracy.")
]
SeedOption = Annotated[int, typer.Option(help="Seed of the split, the weights and the shuffling.")]
KFoldOption = Annotated[
    int | None,
    typer.Option(
        "--k-fold",
        min=2,
        help="First cross-validate with K folds of the train+validation data (K more "
        "trainings); per-fold and mean±std accuracy are stored with the version.",
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Held-out data to measure with (default: the split the training run held out).",
    ),
]
DigitsOption = Annotated[
    bool, typer.Option("--sklearn-digits", help="Measure on scikit-learn's digits.")
]


def run_job(module: str, args: list[str], home: Path | None) -> None:
    """Run ``python -m lmaas.lifecycle.jobs.<module> ARGS`` and exit with its status."""
    settings = load_settings(home)
    settings.home.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", f"lmaas.lifecycle.jobs.{module}", *args,
        "--home", str(settings.home), "--database-url", settings.resolved_database_url(),
    ]  # fmt: skip
    # Ignore Ctrl-C here from before the job exists (no window where it would kill only the
    # CLI); the job gets the default disposition back, so Python raises KeyboardInterrupt in it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen(command, preexec_fn=_default_sigint)
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if code == 130 or code == -signal.SIGINT:
        typer.echo("cancelled", err=True)
    raise typer.Exit(code=130 if code < 0 else code)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


P = TypeVar("P", bound=JobParams)


def _params(params_model: type[P], /, **options: Any) -> P:
    """The options checked by the same rules as ``POST /admin/jobs`` (bad ones: exit 2)."""
    try:
        return params_model.model_validate(options)
    except ValidationError as exc:
        raise typer.BadParameter(validation_message(exc, params_model)) from exc


def run_params(params: JobParams, home: Path | None) -> None:
    """Run the job the options describe, in the foreground."""
    run_job(params.module, params.job_args(), home)


@train_app.command("image-classifier")
def train_image_classifier(
    name: NameOption,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", exists=True, file_okay=False, help="Folder of images: DIR/<label>/*.png."
        ),
    ] = None,
    sklearn_digits: Annotated[
        bool, typer.Option("--sklearn-digits", help="Train on scikit-learn's 8x8 digits.")
    ] = False,
    epochs: EpochsOption = None,
    patience: PatienceOption = 3,
    val_split: ValSplitOption = 0.15,
    test_split: TestSplitOption = 0.2,
    image_size: Annotated[int, typer.Option(min=1, help="Side the images are resized to.")] = 8,
    patch_size: Annotated[
        int | None, typer.Option(min=1, help="ViT patch side (default: the image size).")
    ] = None,
    hidden_size: Annotated[int, typer.Option(min=8, help="Width of the transformer.")] = 128,
    layers: Annotated[int, typer.Option(min=1, help="Transformer layers.")] = 2,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, cosine).")] = None,
    seed: SeedOption = 0,
    k_fold: KFoldOption = None,
    home: HomeOption = None,
) -> None:
    """Train a small ViT image classifier (servable by the image-classification runtime)."""
    params = _params(
        TrainImageClassifierParams, name=name, data=data, sklearn_digits=sklearn_digits,
        epochs=epochs, patience=patience, val_split=val_split, test_split=test_split,
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, layers=layers,
        lr=lr, seed=seed, k_fold=k_fold,
    )  # fmt: skip
    run_params(params, home)


@train_app.command("text-classifier")
def train_text_classifier(
    data: Annotated[
        Path,
        typer.Option("--data", exists=True, dir_okay=False, help="Labelled texts: .jsonl or .csv."),
    ],
    base: Annotated[str, typer.Option("--base", help="Encoder to fine-tune: NAME[:VERSION].")],
    name: NameOption,
    epochs: EpochsOption = None,
    patience: PatienceOption = 3,
    val_split: ValSplitOption = 0.15,
    test_split: TestSplitOption = 0.2,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 5e-5).")] = None,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens kept per text.")] = 128,
    seed: SeedOption = 0,
    k_fold: KFoldOption = None,
    home: HomeOption = None,
) -> None:
    """Fine-tune an encoder with a classification head (servable by the classification runtime)."""
    params = _params(
        TrainTextClassifierParams, data=data, base=base, name=name, epochs=epochs,
        patience=patience, val_split=val_split, test_split=test_split, lr=lr,
        max_length=max_length, seed=seed, k_fold=k_fold,
    )  # fmt: skip
    run_params(params, home)


@train_app.command("chat-lora")
def train_chat_lora(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            exists=True,
            dir_okay=False,
            help='Chat JSONL: one {"messages": [{"role": ..., "content": ...}, ...]} a line.',
        ),
    ],
    base: Annotated[
        str, typer.Option("--base", help="Chat/causal LM to fine-tune: NAME[:VERSION|@ALIAS].")
    ],
    name: NameOption,
    epochs: EpochsOption = None,
    patience: PatienceOption = 3,
    val_split: ValSplitOption = 0.15,
    test_split: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Fraction held out for the reported loss.")
    ] = 0.1,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-4).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Conversations per step.")] = 4,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens kept per conversation.")] = 512,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank r.")] = 8,
    alpha: Annotated[float, typer.Option(min=0.0, help="LoRA alpha (scale alpha/r).")] = 16.0,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.9, help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[
        str,
        typer.Option(
            help="Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear."
        ),
    ] = "all-linear",
    seed: SeedOption = 0,
    home: HomeOption = None,
) -> None:
    """LoRA fine-tune a chat model (peft) on its assistant turns; merged into a new version."""
    params = _params(
        TrainChatLoraParams, data=data, base=base, name=name, epochs=epochs, patience=patience,
        val_split=val_split, test_split=test_split, lr=lr, batch_size=batch_size,
        max_length=max_length, rank=rank, alpha=alpha, dropout=dropout,
        target_modules=target_modules, seed=seed,
    )  # fmt: skip
    run_params(params, home)


def compress_command(
    model: Annotated[str, typer.Argument(metavar="MODEL[:VERSION]", help="The parent version.")],
    int8: Annotated[bool, typer.Option("--int8", help="Int8 Linear weights.")] = False,
    prune: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Magnitude pruning to this sparsity (no fine-tune)."),
    ] = None,
    all_layers: Annotated[
        bool,
        typer.Option(
            "--all-layers",
            help="ONNX versions: quantise the convolutions too (smaller; the recorded "
            "accuracy delta says what it cost).",
        ),
    ] = False,
    name: Annotated[str | None, typer.Option(help="Name of the new version's model.")] = None,
    data: DataOption = None,
    sklearn_digits: DigitsOption = False,
    home: HomeOption = None,
) -> None:
    """Compress a classifier into a new version; records size, latency and accuracy delta.

    Safetensors versions are compressed with torch (int8 Linear weights, or pruning); ONNX
    versions (from `lmaas convert --onnx`) take --int8, quantised by onnxruntime.
    """
    params = _params(
        CompressParams, model=model, int8=int8, prune=prune, all_layers=all_layers, name=name,
        data=data, sklearn_digits=sklearn_digits,
    )  # fmt: skip
    run_params(params, home)


def convert_command(
    model: Annotated[str, typer.Argument(metavar="MODEL[:VERSION]", help="The parent version.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX.")] = False,
    name: Annotated[str | None, typer.Option(help="Name of the new version's model.")] = None,
    max_abs_diff: Annotated[
        float,
        typer.Option(
            min=0.0, help="Largest logit (or embedding) difference the parity check allows."
        ),
    ] = 1e-4,
    min_top1_agreement: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of samples whose top-1 must agree (embeddings: cosine >= 1 - 1e-5).",
        ),
    ] = 1.0,
    samples: Annotated[
        int, typer.Option(min=1, help="Random samples when the parent has no held-out data.")
    ] = 64,
    data: DataOption = None,
    sklearn_digits: DigitsOption = False,
    home: HomeOption = None,
) -> None:
    """Convert a version to ONNX; fails (no version) when the parity check does not hold."""
    params = _params(
        ConvertParams, model=model, onnx=onnx, name=name, max_abs_diff=max_abs_diff,
        min_top1_agreement=min_top1_agreement, samples=samples, data=data,
        sklearn_digits=sklearn_digits,
    )  # fmt: skip
    run_params(params, home)
