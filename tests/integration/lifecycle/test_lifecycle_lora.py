"""`lmaas train chat-lora`: LoRA on a tiny random Llama, merged, registered and served."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from lmaas.core.messages import ChatMessage
from lmaas.lifecycle.jobs import lora, train
from lmaas.registry.service import RegistryService
from lmaas.runtimes.llm.hf_prompt import chat_template_of
from lmaas.testing.tiny_models import build_tiny_causal_lm
from lmaas.testing.tiny_text_heads import build_tiny_classifier
from tests.integration.cli_jobs import interrupt_after_first_epoch
from tests.integration.serverproc import ServerProcess, start_server


def _registry(home: Path) -> RegistryService:
    return RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)


def _job_args(home: Path) -> list[str]:
    return ["--home", str(home), "--database-url", f"sqlite:///{home / 'lmaas.db'}"]


def _chats(path: Path, count: int = 40) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(count):
        colour = rng.choice(["red", "green", "blue", "yellow"])
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": f"What colour is item {i}?"},
                    {"role": "assistant", "content": f"The colour is {colour}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chat:1 (tiny random Llama) and chat-ft:1 (its LoRA fine-tune, through the CLI)."""
    root = tmp_path_factory.mktemp("lora")
    home = root / "home"
    with _registry(home) as registry:
        registry.import_model(str(build_tiny_causal_lm(root / "llama", "llama")), name="chat")
    command = [
        sys.executable, "-m", "lmaas.cli", "train", "chat-lora", "--data",
        str(_chats(root / "chats.jsonl")), "--base", "chat", "--name", "chat-ft",
        "--epochs", "4", "--lr", "5e-3", "--rank", "4", "--home", str(home),
    ]  # fmt: skip
    env = {**os.environ, "LMAAS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered chat-ft:1 (chat) from chat:1" in done.stdout
    assert "epoch 4: train loss" in done.stderr or "stopping" in done.stderr
    return home


def test_loss_decreases_and_lineage_is_recorded(home: Path) -> None:
    with _registry(home) as registry:
        manifest = registry.get("chat-ft")
    metrics = {m.metric: m.value for m in manifest.metrics}
    assert metrics["loss"] < metrics["parent_loss"]
    assert metrics["perplexity"] < metrics["parent_perplexity"]
    assert metrics["loss_delta"] == pytest.approx(metrics["loss"] - metrics["parent_loss"])
    assert metrics["held_out_examples"] == 4 and metrics["held_out_tokens"] > 0
    assert manifest.task.value == "chat"
    assert manifest.lineage is not None and manifest.lineage.parent == "chat:1"
    assert manifest.lineage.transform == "lora-fine-tune"
    params = manifest.lineage.parameters
    assert params["rank"] == 4 and params["target_modules"] == "all-linear"
    assert params["trainable_parameters"] > 0 and 1 <= params["best_epoch"] <= params["epochs_run"]
    files = {f.path for f in manifest.files}
    assert "model.safetensors" in files and "tokenizer_config.json" in files
    assert not any("adapter" in f for f in files)  # merged: a plain checkpoint


def test_merged_weights_differ_from_the_base(home: Path) -> None:
    import transformers

    with _registry(home) as registry:
        base_dir = registry.model_dir(registry.get("chat", "1"))
        tuned_dir = registry.model_dir(registry.get("chat-ft"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(tuned_dir))
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    assert base_state.keys() == tuned_state.keys()  # no LoRA leftovers
    changed = [k for k in base_state if not torch.equal(base_state[k], tuned_state[k])]
    assert any("q_proj" in k for k in changed)
    assert tuned.dtype == base.dtype


def test_only_assistant_turns_carry_labels(home: Path) -> None:
    import transformers

    with _registry(home) as registry:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(registry.model_dir(registry.get("chat", "1")))
        )
    template = chat_template_of(tokenizer)
    assert template is not None
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    encoded = lora.encode_chat(template, tokenizer, messages, 512)
    learned = tokenizer.decode([t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True)
                                if lab != lora.IGNORE])  # fmt: skip
    assert learned == "hello there<|im_end|>\nsee you<|im_end|>\n"
    # The prompt part is tokenised exactly as the server tokenises a chat prompt.
    chat = [ChatMessage(m["role"], m["content"]) for m in messages[:1]]
    prompt = tokenizer.encode(template.render(chat, add_generation_prompt=True),
                              add_special_tokens=False)  # fmt: skip
    assert encoded.input_ids[: len(prompt)] == prompt
    assert set(encoded.labels[: len(prompt)]) == {lora.IGNORE}


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[ServerProcess]:
    proc = start_server(home, ["chat-ft"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_merged_version_serves_through_the_engine(server: ServerProcess) -> None:
    body = {
        "model": "chat-ft",
        "messages": [{"role": "user", "content": "What colour is item 3?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["model"] == "chat-ft"
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert answer["usage"]["completion_tokens"] >= 1


def test_bad_inputs_get_clear_errors(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(data: Path, base: str = "chat") -> str:
        args = ["chat-lora", "--data", str(data), "--base", base, "--name", "x"]
        assert train.main([*args, "--epochs", "1", *_job_args(home)]) == 1
        return capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert "bad.jsonl:1: the conversation has no assistant message" in run(bad)
    bad.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    assert "bad.jsonl:1: messages[0] needs a role" in run(bad)
    bad.write_text('{"text": "hi"}\n')
    assert 'bad.jsonl:1: expected {"messages": [...]}' in run(bad)
    with _registry(home) as registry:
        registry.import_model(str(build_tiny_classifier(tmp_path / "cls")), name="cls")
    assert "LoRA fine-tuning takes a chat or completion" in run(
        _chats(tmp_path / "ok.jsonl"), "cls"
    )
    with _registry(home) as registry:
        assert {m.name for m in registry.list_models()} == {"chat", "chat-ft", "cls"}


def test_ctrl_c_cancels_the_fine_tune_and_registers_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with _registry(home) as registry:
        registry.import_model(str(build_tiny_causal_lm(tmp_path / "llama", "llama")), name="chat")
    command = [
        sys.executable, "-m", "lmaas.cli", "train", "chat-lora", "--data",
        str(_chats(tmp_path / "chats.jsonl")), "--base", "chat", "--name", "cancelled",
        "--epochs", "500", "--patience", "500", "--home", str(home),
    ]  # fmt: skip
    rest = interrupt_after_first_epoch(command)
    assert "no version was registered" in rest
    with _registry(home) as registry:
        assert [m.ref for m in registry.list_models()] == ["chat:1"]
