from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from typer.testing import CliRunner

from lmaas.cli.models import models_app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("LMAAS_HOME", "LMAAS_DATABASE_URL", "LMAAS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    src = tmp_path / "Tiny-Bert"
    src.mkdir()
    config = {"architectures": ["BertModel"], "model_type": "bert", "max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(src / "model.safetensors"))
    return src


def _run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(models_app, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_import_list_show_rm(home: Path, model_dir: Path) -> None:
    code, out, err = _run("import", str(model_dir), "--home", str(home))
    assert code == 0, err
    assert "imported tiny-bert:1 (embedding, safetensors" in out
    code, out, _ = _run("import", str(model_dir), "--name", "other", "--home", str(home))
    assert code == 0 and "other:1" in out

    code, out, _ = _run("list", "--home", str(home))
    assert code == 0
    assert "tiny-bert" in out and "embedding" in out and "other" in out
    code, out, _ = _run("list", "--json", "--home", str(home))
    assert [(m["name"], m["version"]) for m in json.loads(out)] == [
        ("other", "1"),
        ("tiny-bert", "1"),
    ]

    code, out, _ = _run("show", "tiny-bert:1", "--home", str(home))
    assert code == 0
    shown = yaml.safe_load(out)
    assert (shown["name"], shown["task"], shown["context_length"]) == ("tiny-bert", "embedding", 64)

    code, out, _ = _run("rm", "tiny-bert", "--home", str(home), stdin="n\n")
    assert code == 1  # declined
    code, out, _ = _run("rm", "tiny-bert:1", "--home", str(home), stdin="y\n")
    assert code == 0 and "removed tiny-bert:1" in out
    code, out, _ = _run("rm", "other", "--yes", "--home", str(home))
    assert code == 0 and "removed other:1" in out
    code, out, _ = _run("list", "--home", str(home))
    assert "no models imported yet" in out


def test_import_with_task(home: Path, model_dir: Path) -> None:
    code, out, err = _run("import", str(model_dir), "--task", "rerank", "--home", str(home))
    assert code == 0, err
    assert "(rerank," in out


@pytest.mark.parametrize(
    "args",
    [
        ("show", "missing"),
        ("show", "../etc"),
        ("rm", "missing", "--yes"),
        ("import", "org/model"),
        ("import", "/definitely/not/here"),
    ],
)
def test_errors_are_one_red_line_and_exit_1(home: Path, args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(
        models_app, [*args, "--home", str(home)], env={"LMAAS_OFFLINE": "1"}
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_pickle_refusal_and_flag(home: Path, model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    code, _, err = _run("import", str(model_dir), "--home", str(home))
    assert code == 1 and "--allow-pickle" in err
    code, _, err = _run("import", str(model_dir), "--allow-pickle", "--home", str(home))
    assert code == 0, err
