"""``lmaas train``: train an image classifier or fine-tune a text classifier, register it.

Run as ``python -m lmaas.lifecycle.jobs.train image-classifier|text-classifier ...`` (the CLI
does). The data is split with a seed into train, validation (early stopping: the best epoch's
weights are kept, training stops after ``patience`` epochs without a better validation accuracy)
and test (held out: the reported accuracy). The model is saved in Hugging Face layout, measured
on the test split through the serving runtime itself, then registered with lineage
(``transform: train`` and every setting) and its metrics.

``--k-fold K`` first cross-validates: ``K`` fresh models are trained on the train+validation
examples, each without one fold, and scored on that fold; the per-fold accuracies and their
mean and standard deviation are stored with the version (``cv_accuracy_*`` metrics and the
lineage's ``cv_fold_accuracies``). The registered model is then trained as without the flag.

The image classifier is a small ``ViTForImageClassification`` with a ``ViTImageProcessor``
(resize, rescale, normalise to [-1, 1]): the ``image-classification`` runtime serves it as is.
With the default ``--patch-size`` equal to ``--image-size`` the whole image is one patch, which
makes the transformer a residual MLP: on 8x8 digits it trains to ≥ 0.95 in a few epochs on a CPU,
and almost all its weights are in Linear layers, which int8 compression shrinks fourfold.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmaas.core.errors import InvalidRequestError
from lmaas.core.types import ModelFormat, Task
from lmaas.lifecycle import data as datasets
from lmaas.lifecycle.jobs.common import (
    ProgressEvents,
    VersionProbe,
    accuracy,
    add_registry_args,
    image_requests,
    metric,
    open_registry,
    register,
    run_job,
    text_requests,
    worker_spec,
)
from lmaas.registry.manifest import Lineage, MetricRecord

_log = logging.getLogger("lmaas.lifecycle.train")


@dataclass(frozen=True, slots=True)
class FitResult:
    """How a training run ended."""

    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    stopped_early: bool
    best_val_loss: float = math.nan


def classification_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's ``.logits`` against integer labels."""
    loss: torch.Tensor = torch.nn.functional.cross_entropy(output.logits, labels)
    return loss


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights training changes (all of a classifier; the adapters of LoRA)."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def fit(
    model: torch.nn.Module,
    *,
    num_train: int,
    batch: Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]],
    validate: Callable[[], tuple[float, float]],
    epochs: int,
    patience: int,
    lr: float,
    batch_size: int,
    seed: int,
    label: str,
    criterion: Callable[[Any, torch.Tensor], torch.Tensor] = classification_loss,
) -> FitResult:
    """Train with AdamW and a cosine schedule; keep the weights of the best validation epoch.

    Args:
        model: A Hugging Face model returning ``.logits``.
        num_train: Training examples; ``batch(indices)`` returns ``(model kwargs, labels)``.
        validate: ``(accuracy, mean loss)`` on the validation split (model in eval mode). An
            epoch is better when its accuracy is higher, or equal with a lower loss: on a small
            validation split many epochs tie on accuracy.
        epochs: Most epochs; ``patience`` epochs without improvement stop early.
        lr, batch_size, seed: Optimiser settings and the shuffling seed.
        label: The progress bar's title.
        criterion: The training loss of ``(model output, labels)``; a causal LM's is its own
            ``.loss`` (``validate`` then returns ``(-loss, loss)``: lower loss is better).
    """
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(num_train / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch)))
    )
    best_state = _trainable_state(model)
    best, best_epoch, stale, epoch = (-math.inf, -math.inf), 0, 0, 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        bar = progress.add_task(label, total=epochs * steps_per_epoch)
        events = ProgressEvents(epochs * steps_per_epoch, label)
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(num_train, generator=generator)
            for start in range(0, num_train, batch_size):
                inputs, labels = batch(order[start : start + batch_size])
                loss = criterion(model(**inputs), labels)
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
                progress.advance(bar)
                events.advance()
            model.eval()
            with torch.no_grad():
                acc, val_loss = validate()
            scored = f", accuracy {acc:.4f}" if criterion is classification_loss else ""
            _log.info(
                "epoch %d: train loss %.4f, validation loss %.4f%s",
                epoch, loss.item(), val_loss, scored,
            )  # fmt: skip
            shown = f"val acc {acc:.3f}" if scored else f"val loss {val_loss:.3f}"
            progress.update(bar, description=f"{label} (epoch {epoch}, {shown})")
            if (acc, -val_loss) > best:
                best, best_epoch, stale = (acc, -val_loss), epoch, 0
                best_state = _trainable_state(model)
            else:
                stale += 1
                if stale >= patience:
                    _log.info("no better validation epoch for %d epochs: stopping", patience)
                    break
        events.finish()
    model.load_state_dict(best_state, strict=False)
    model.eval()
    return FitResult(best_epoch, best[0], epoch, epoch < epochs, -best[1])


# ---------------------------------------------------------------- k-fold cross-validation


@dataclass(frozen=True, slots=True)
class CrossValidation:
    """Accuracy of ``k`` models, each trained without one fold and scored on it."""

    fold_accuracies: list[float]
    digest: str
    """sha256 of the examples the folds were cut from (the data minus its test split)."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.fold_accuracies)

    @property
    def std(self) -> float:
        """Population standard deviation (numpy's default, ``ddof=0``)."""
        return statistics.pstdev(self.fold_accuracies)


FitOn = Callable[[list[int], list[int], str], tuple[Any, FitResult]]


def cross_validate(
    args: argparse.Namespace,
    pool: list[int],
    fit_on: FitOn,
    score: Callable[[Any, list[int]], float],
    digest: str,
) -> CrossValidation | None:
    """``--k-fold K``: train ``K`` fresh models on the train+validation examples, each
    without one fold (early stopping on a validation part of the others), and score each on the
    fold it did not see. None without ``--k-fold``. The test split stays out of every fold.
    """
    if not args.k_fold:
        return None
    val_fraction = args.val_split / max(1e-9, 1.0 - args.test_split)
    folds = datasets.k_folds(pool, args.k_fold, val_fraction=val_fraction)
    scores = []
    for number, (train, val, held_out) in enumerate(folds, 1):
        model, _ = fit_on(train, val, f"fold {number}/{len(folds)} of {args.name}")
        model.eval()
        scores.append(score(model, held_out))
        _log.info(
            "fold %d/%d: accuracy %.4f on %d examples", number, len(folds), scores[-1],
            len(held_out),
        )  # fmt: skip
    result = CrossValidation(scores, digest)
    print(
        f"{len(folds)}-fold cross-validation: accuracy {result.mean:.4f} ± {result.std:.4f} "
        f"(folds: {', '.join(f'{a:.4f}' for a in scores)})",
        flush=True,
    )
    return result


def cv_metrics(cv: CrossValidation | None) -> list[MetricRecord]:
    """``cv_accuracy_mean``, ``cv_accuracy_std``, ``cv_folds`` and ``cv_accuracy_fold<i>``."""
    if cv is None:
        return []
    records = [
        metric("cv_accuracy_mean", cv.mean, cv.digest),
        metric("cv_accuracy_std", cv.std, cv.digest),
        metric("cv_folds", len(cv.fold_accuracies), cv.digest),
    ]
    records += [
        metric(f"cv_accuracy_fold{i}", value, cv.digest)
        for i, value in enumerate(cv.fold_accuracies, 1)
    ]
    return records


# ---------------------------------------------------------------- image classifier


def _image_data(args: argparse.Namespace) -> datasets.LabelledImages:
    if args.sklearn_digits:
        return datasets.load_digits_images()
    return datasets.load_image_folder(Path(args.data))


def write_image_processor(dest: Path, image_size: int) -> None:
    """A ``ViTImageProcessor`` config: RGB, resized to ``image_size``², scaled to [-1, 1]."""
    config = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (dest / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _pixels(processor: Any, images: list[Any]) -> torch.Tensor:
    chunks = [
        processor(images=[img.convert("RGB") for img in images[i : i + 256]], return_tensors="pt")[
            "pixel_values"
        ]
        for i in range(0, len(images), 256)
    ]
    return torch.cat(chunks).to(torch.float32)


def train_image_classifier(args: argparse.Namespace) -> int:
    """The ``image-classifier`` command."""
    import transformers

    data = _image_data(args)
    parts = datasets.split(
        len(data.labels), test_fraction=args.test_split, val_fraction=args.val_split, seed=args.seed
    )
    if not parts.val:
        raise InvalidRequestError("early stopping needs a validation split (--val-split > 0)")
    with open_registry(args) as registry, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / args.name
        out.mkdir()
        write_image_processor(out, args.image_size)
        processor = transformers.AutoImageProcessor.from_pretrained(str(out))  # type: ignore[no-untyped-call]
        pixels = _pixels(processor, data.images)
        labels = torch.tensor(data.labels)
        names = data.label_names
        config = transformers.ViTConfig(
            image_size=args.image_size, patch_size=args.patch_size, num_channels=3,
            hidden_size=args.hidden_size, num_hidden_layers=args.layers,
            num_attention_heads=4, intermediate_size=2 * args.hidden_size,
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            architectures=["ViTForImageClassification"],
        )  # fmt: skip

        def fit_on(train: list[int], val: list[int], label: str) -> tuple[Any, FitResult]:
            torch.manual_seed(args.seed)
            model = transformers.ViTForImageClassification(config)
            train_idx, val_idx = torch.tensor(train), torch.tensor(val)

            def batch(order: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
                rows = train_idx[order]
                return {"pixel_values": pixels[rows]}, labels[rows]

            def validate() -> tuple[float, float]:
                logits = model(pixel_values=pixels[val_idx]).logits
                loss = torch.nn.functional.cross_entropy(logits, labels[val_idx])
                return float((logits.argmax(-1) == labels[val_idx]).float().mean()), float(loss)

            result = fit(
                model, num_train=len(train), batch=batch, validate=validate,
                epochs=args.epochs, patience=args.patience, lr=args.lr,
                batch_size=args.batch_size, seed=args.seed, label=label,
            )  # fmt: skip
            return model, result

        def score(model: Any, rows: list[int]) -> float:
            with torch.no_grad():
                logits = model(pixel_values=pixels[torch.tensor(rows)]).logits
            return float((logits.argmax(-1) == labels[torch.tensor(rows)]).float().mean())

        pool = parts.train + parts.val
        cv = cross_validate(args, pool, fit_on, score, datasets.images_digest(data, pool))
        model, result = fit_on(parts.train, parts.val, f"training {args.name}")
        model.save_pretrained(str(out), safe_serialization=True)
        probe = VersionProbe(worker_spec(args.name, out, Task.IMAGE_CLASSIFICATION, _SAFE))
        test_probs = probe.probabilities(image_requests(data, parts.test))
        test_labels = [data.labels[i] for i in parts.test]
        digest = datasets.images_digest(data, parts.test)
        parameters = _train_parameters(args, data.source, result, len(data.labels), cv)
        return _finish(
            registry, out, args, Task.IMAGE_CLASSIFICATION, None, parameters,
            accuracy(test_probs, test_labels), len(parts.test), result, digest, cv,
        )  # fmt: skip


_SAFE = ModelFormat.SAFETENSORS


def _train_parameters(
    args: argparse.Namespace,
    source: str,
    result: FitResult,
    count: int,
    cv: CrossValidation | None,
) -> dict[str, Any]:
    skip = {"home", "database_url", "command", "name", "data", "sklearn_digits", "base"}
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    folds = {"cv_fold_accuracies": [round(a, 6) for a in cv.fold_accuracies]} if cv else {}
    return {
        "data": source,
        "examples": count,
        **settings,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": round(result.best_val_accuracy, 6),
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        **folds,
    }


def _finish(
    registry: Any,
    out: Path,
    args: argparse.Namespace,
    task: Task,
    parent: str | None,
    parameters: dict[str, Any],
    test_accuracy: float,
    num_test: int,
    result: FitResult,
    digest: str,
    cv: CrossValidation | None,
) -> int:
    metrics = [
        metric("accuracy", test_accuracy, digest),
        metric("test_examples", num_test, digest),
        *cv_metrics(cv),
    ]
    manifest = register(
        registry, out, name=args.name, task=task,
        lineage=Lineage(parent=parent, transform="train", parameters=parameters),
        metrics=metrics,
        description=f"trained by `lmaas train` on {parameters['data']}",
    )  # fmt: skip
    print(
        f"registered {manifest.ref} ({task.value}): held-out accuracy {test_accuracy:.4f} on "
        f"{num_test} examples (best validation accuracy {result.best_val_accuracy:.4f} at epoch "
        f"{result.best_epoch} of {result.epochs_run})",
        flush=True,
    )
    return 0


# ---------------------------------------------------------------- text classifier


def train_text_classifier(args: argparse.Namespace) -> int:
    """The ``text-classifier`` command: fine-tune ``--base`` with a fresh classification head."""
    import transformers

    data = datasets.load_texts(Path(args.data))
    parts = datasets.split(
        len(data.labels), test_fraction=args.test_split, val_fraction=args.val_split, seed=args.seed
    )
    if not parts.val:
        raise InvalidRequestError("early stopping needs a validation split (--val-split > 0)")
    with open_registry(args) as registry, tempfile.TemporaryDirectory() as tmp:
        base = registry.resolve(args.base)
        base_dir = registry.model_dir(base)
        names = data.label_names
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        labels = torch.tensor(data.labels)

        def encode(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            texts = [data.texts[int(i)] for i in rows]
            enc = tokenizer(
                texts, padding=True, truncation=True, max_length=args.max_length,
                return_tensors="pt",
            )  # fmt: skip
            return dict(enc)

        def evaluate(model: Any, rows_idx: torch.Tensor) -> tuple[float, float]:
            correct, total_loss = 0, 0.0
            for start in range(0, len(rows_idx), 64):
                rows = rows_idx[start : start + 64]
                logits = model(**encode(rows)).logits
                correct += int((logits.argmax(-1) == labels[rows]).sum())
                loss = torch.nn.functional.cross_entropy(logits, labels[rows], reduction="sum")
                total_loss += float(loss)
            return correct / len(rows_idx), total_loss / len(rows_idx)

        def fit_on(train: list[int], val: list[int], label: str) -> tuple[Any, FitResult]:
            torch.manual_seed(args.seed)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(base_dir), local_files_only=True, use_safetensors=True,
                num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True,
                problem_type="single_label_classification",
            )  # fmt: skip
            train_idx, val_idx = torch.tensor(train), torch.tensor(val)

            def batch(order: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
                rows = train_idx[order]
                return encode(rows), labels[rows]

            result = fit(
                model, num_train=len(train), batch=batch,
                validate=lambda: evaluate(model, val_idx), epochs=args.epochs,
                patience=args.patience, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                label=label,
            )  # fmt: skip
            return model, result

        def score(model: Any, rows: list[int]) -> float:
            with torch.no_grad():
                return evaluate(model, torch.tensor(rows))[0]

        pool = parts.train + parts.val
        cv = cross_validate(args, pool, fit_on, score, datasets.texts_digest(data, pool))
        model, result = fit_on(parts.train, parts.val, f"fine-tuning {base.ref} into {args.name}")
        out = Path(tmp) / args.name
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        probe = VersionProbe(worker_spec(args.name, out, Task.CLASSIFICATION, _SAFE))
        test = parts.test or parts.val
        test_probs = probe.probabilities(text_requests(data, test))
        digest = datasets.texts_digest(data, test)
        parameters = _train_parameters(args, data.source, result, len(data.labels), cv)
        return _finish(
            registry, out, args, Task.CLASSIFICATION, base.ref, parameters,
            accuracy(test_probs, [data.labels[i] for i in test]), len(test), result, digest, cv,
        )  # fmt: skip


# ---------------------------------------------------------------- command line


def _common(parser: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int) -> None:
    add_registry_args(parser)
    parser.add_argument("--name", required=True)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--val-split", type=float, default=0.15)
    parser.add_argument("--test-split", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--k-fold", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments (the CLI validates them first and passes them on)."""
    parser = argparse.ArgumentParser(prog="python -m lmaas.lifecycle.jobs.train")
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image-classifier")
    source = image.add_mutually_exclusive_group(required=True)
    source.add_argument("--data")
    source.add_argument("--sklearn-digits", action="store_true")
    _common(image, epochs=20, lr=1e-3, batch_size=32)
    image.add_argument("--image-size", type=int, default=8)
    image.add_argument("--patch-size", type=int, default=None)
    image.add_argument("--hidden-size", type=int, default=128)
    image.add_argument("--layers", type=int, default=2)
    text = commands.add_parser("text-classifier")
    text.add_argument("--data", required=True)
    text.add_argument("--base", required=True)
    text.add_argument("--max-length", type=int, default=128)
    _common(text, epochs=5, lr=5e-5, batch_size=16)
    from lmaas.lifecycle.jobs import lora  # imports this module: not at the top

    lora.add_parser(commands, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the chosen training job."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    elif args.command == "image-classifier":
        torch.set_num_threads(1)  # a small model: more threads only wait on each other
    if args.command == "image-classifier":
        if args.patch_size is None:
            args.patch_size = args.image_size
        return run_job(lambda: train_image_classifier(args))
    if args.command == "chat-lora":
        from lmaas.lifecycle.jobs import lora

        return run_job(lambda: lora.train_chat_lora(args))
    return run_job(lambda: train_text_classifier(args))


if __name__ == "__main__":
    sys.exit(main())
