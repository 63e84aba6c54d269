"""`lmaas train --k-fold K`: per-fold and mean±std accuracy stored with the version."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from lmaas.lifecycle.jobs import train
from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_text_heads import build_tiny_classifier


def _registry(home: Path) -> RegistryService:
    return RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)


def test_digits_cross_validation_through_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    command = [
        sys.executable, "-m", "lmaas.cli", "train", "image-classifier", "--sklearn-digits",
        "--name", "digits", "--epochs", "3", "--hidden-size", "32", "--layers", "1",
        "--lr", "3e-3", "--k-fold", "3", "--home", str(home),
    ]  # fmt: skip
    env = {**os.environ, "LMAAS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3-fold cross-validation: accuracy" in done.stdout
    assert "fold 3/3: accuracy" in done.stderr
    with _registry(home) as registry:
        manifest = registry.get("digits", "1")
    metrics = {m.metric: m.value for m in manifest.metrics}
    folds = [metrics[f"cv_accuracy_fold{i}"] for i in (1, 2, 3)]
    assert metrics["cv_folds"] == 3
    assert metrics["cv_accuracy_mean"] == statistics.fmean(folds)
    assert metrics["cv_accuracy_std"] == statistics.pstdev(folds)
    assert all(0.5 <= a <= 1.0 for a in folds)  # 3 epochs of a tiny model: well above chance
    assert manifest.lineage is not None and manifest.lineage.parameters["k_fold"] == 3
    assert manifest.lineage.parameters["cv_fold_accuracies"] == [round(a, 6) for a in folds]
    # The folds are cut from the train+validation examples: their digest is not the test set's.
    assert metrics["test_examples"] == 359
    digests = {m.metric: m.dataset_digest for m in manifest.metrics}
    assert digests["cv_accuracy_mean"] != digests["accuracy"]


def test_text_classifier_cross_validation(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with _registry(home) as registry:
        registry.import_model(str(build_tiny_classifier(tmp_path / "base")), name="base")
    rows = [{"text": f"the cat sat on the mat {i}", "label": "cat"} for i in range(10)]
    rows += [{"text": f"a dog ran in the park {i}", "label": "dog"} for i in range(10)]
    data = tmp_path / "pets.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    job = ["--home", str(home), "--database-url", f"sqlite:///{home / 'lmaas.db'}"]
    code = train.main(
        ["text-classifier", "--data", str(data), "--base", "base", "--name", "pets",
         "--epochs", "1", "--lr", "1e-3", "--k-fold", "2", *job]
    )  # fmt: skip
    assert code == 0
    with _registry(home) as registry:
        metrics = {m.metric: m.value for m in registry.get("pets").metrics}
    assert metrics["cv_folds"] == 2
    assert {"cv_accuracy_fold1", "cv_accuracy_fold2", "cv_accuracy_std"} <= set(metrics)
    too_many = ["text-classifier", "--data", str(data), "--base", "base", "--name", "x",
                "--k-fold", "9", *job]  # fmt: skip
    assert train.main(too_many) == 1
