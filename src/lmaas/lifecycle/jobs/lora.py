"""``lmaas train chat-lora``: LoRA fine-tune of a chat model (peft), merged into a new version.

Run as ``python -m lmaas.lifecycle.jobs.train chat-lora ...`` (the CLI does). Each conversation
of the chat JSONL is rendered with the base model's own chat template, in the sandbox the server
renders it in (:class:`~lmaas.runtimes.llm.chat_template.ChatTemplate`), and tokenised the way
the server tokenises a prompt (the rendered text, no added special tokens). The loss is on the
assistant turns only: for each assistant message, the text the template adds for it after the
generation prompt (its content and the end-of-turn marker, so the model learns to stop).

LoRA adapters (``--rank``, ``--alpha``, ``--dropout`` on ``--target-modules``, default every
Linear but the output head) are trained with AdamW and a cosine schedule; early stopping keeps
the adapters of the epoch with the lowest validation loss. The adapters are then merged into the
base weights (``merge_and_unload``), so the new version is a plain checkpoint of the base's
architecture and dtype that the torch runner serves like its parent. The held-out loss and
perplexity (assistant tokens) of the base and of the merged model are recorded.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import ChatMessage
from lmaas.core.types import Task
from lmaas.lifecycle import data as datasets
from lmaas.lifecycle.jobs.common import (
    copy_side_files,
    metric,
    open_registry,
    register,
)
from lmaas.lifecycle.jobs.train import FitResult, fit
from lmaas.registry.manifest import Lineage, MetricRecord
from lmaas.runtimes.llm.chat_template import ChatTemplate
from lmaas.runtimes.llm.hf_prompt import chat_template_of

IGNORE = -100
"""Label of a token the loss skips (prompt and padding)."""
_EVAL_BATCH = 8


@dataclass(frozen=True, slots=True)
class Encoded:
    """One conversation: token ids and labels (``IGNORE`` outside assistant turns)."""

    input_ids: list[int]
    labels: list[int]


def encode_chat(
    template: ChatTemplate, tokenizer: Any, messages: list[dict[str, str]], max_length: int
) -> Encoded:
    """Render and tokenise ``messages``; only assistant turns carry labels.

    The conversation is cut into segments at the assistant turns (the template's rendering of
    the conversation up to a turn, with and without the generation prompt), each segment
    tokenised on its own: the prompt part exactly as the server tokenises a prompt.

    Raises:
        InvalidRequestError: the template does not render prefixes of the conversation as
            prefixes of the whole (it cannot be split into turns).
    """
    chat = [ChatMessage(m["role"], m["content"]) for m in messages]
    full = template.render(chat, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for i, message in enumerate(chat):
        if message.role != "assistant":
            continue
        before = template.render(chat[:i], add_generation_prompt=True) if i else ""
        through = template.render(chat[: i + 1], add_generation_prompt=False)
        if not full.startswith(before) or not full.startswith(through):
            raise InvalidRequestError(
                "the base model's chat template does not render a conversation turn by turn "
                "(a prefix renders differently); it cannot be fine-tuned on assistant turns"
            )
        cuts.append((len(before), len(through)))
    ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in cuts:
        for text, learn in ((full[position:start], False), (full[start:end], True)):
            piece = tokenizer.encode(text, add_special_tokens=False) if text else []
            ids += piece
            labels += piece if learn else [IGNORE] * len(piece)
        position = end
    tail = tokenizer.encode(full[position:], add_special_tokens=False) if full[position:] else []
    ids += tail
    labels += [IGNORE] * len(tail)
    return Encoded(ids[:max_length], labels[:max_length])


def pad(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def held_out_loss(model: Any, rows: list[Encoded], pad_id: int) -> tuple[float, int]:
    """Mean cross-entropy per assistant token over ``rows``, and the token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), _EVAL_BATCH):
            batch = pad(rows[start : start + _EVAL_BATCH], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            shifted = logits.logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            flat = shifted.reshape(-1, shifted.shape[-1])
            loss = torch.nn.functional.cross_entropy(
                flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            total += float(loss)
            count += int((targets != IGNORE).sum())
    return total / max(1, count), count


def _lm_loss(output: Any, _labels: torch.Tensor) -> torch.Tensor:
    loss: torch.Tensor = output.loss
    return loss


def train_chat_lora(args: argparse.Namespace) -> int:
    """The ``chat-lora`` command."""
    import transformers

    # peft asks transformers a deprecated question on every step; the warning is theirs.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    chats = datasets.load_chats(Path(args.data))
    parts = datasets.split(
        len(chats.conversations), test_fraction=args.test_split, val_fraction=args.val_split,
        seed=args.seed,
    )  # fmt: skip
    if not parts.val:
        raise InvalidRequestError("early stopping needs a validation split (--val-split > 0)")
    with open_registry(args) as registry, tempfile.TemporaryDirectory() as tmp:
        base = registry.resolve(args.base)
        if base.task not in (Task.CHAT, Task.COMPLETION):
            raise InvalidRequestError(
                f"{base.ref} is a {base.task.value} model; LoRA fine-tuning takes a chat or "
                "completion (causal LM) model",
                param="base",
            )
        base_dir = registry.model_dir(base)
        trust = base.serving.options.get("trust_remote_code") == "true"
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(base_dir), local_files_only=True, trust_remote_code=trust
        )
        rows = _encode(base.ref, tokenizer, chats, args.max_length)
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        torch.manual_seed(args.seed)
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=torch.float32, local_files_only=True, use_safetensors=True,
            trust_remote_code=trust,
        )  # fmt: skip
        saved_dtype = base_dtype(base_dir)
        held = parts.test or parts.val
        held_rows = [rows[i] for i in held]
        model.eval()
        before, tokens = held_out_loss(model, held_rows, pad_id)
        model = _with_adapters(model, args)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        val_rows = [rows[i] for i in parts.val]
        train_rows = [rows[i] for i in parts.train]

        def batch(order: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            inputs = pad([train_rows[int(i)] for i in order], pad_id)
            return inputs, inputs["labels"]

        def validate() -> tuple[float, float]:
            loss, _ = held_out_loss(model, val_rows, pad_id)
            return -loss, loss

        result = fit(
            model, num_train=len(train_rows), batch=batch, validate=validate,
            epochs=args.epochs, patience=args.patience, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, label=f"LoRA fine-tuning {base.ref} into {args.name}",
            criterion=_lm_loss,
        )  # fmt: skip
        merged = model.merge_and_unload()
        after, _ = held_out_loss(merged, held_rows, pad_id)
        out = Path(tmp) / args.name
        copy_side_files(base_dir, out, lambda rel: not _is_weights(rel))
        merged.to(saved_dtype).save_pretrained(str(out), safe_serialization=True)
        digest = datasets.chats_digest(chats, held)
        metrics = _loss_metrics(before, after, len(held), tokens, digest)
        parameters = _parameters(args, chats, result, trainable)
        manifest = register(
            registry, out, name=args.name, task=base.task,
            lineage=Lineage(parent=base.ref, transform="lora-fine-tune", parameters=parameters),
            metrics=metrics, serving=base.serving.model_dump(),
            description=f"LoRA fine-tune of {base.ref} by `lmaas train chat-lora`",
        )  # fmt: skip
    print(
        f"registered {manifest.ref} ({base.task.value}) from {base.ref}: held-out loss "
        f"{after:.4f} (base {before:.4f}), perplexity {math.exp(after):.2f} (base "
        f"{math.exp(before):.2f}) on {tokens} assistant tokens; best validation loss "
        f"{result.best_val_loss:.4f} at epoch {result.best_epoch} of {result.epochs_run}",
        flush=True,
    )
    return 0


def _encode(ref: str, tokenizer: Any, chats: datasets.Chats, max_length: int) -> list[Encoded]:
    template = chat_template_of(tokenizer)
    if template is None:
        raise InvalidRequestError(
            f"{ref} has no chat template: chat-formatted data cannot be rendered", param="base"
        )
    rows = [encode_chat(template, tokenizer, c, max_length) for c in chats.conversations]
    if any(all(label == IGNORE for label in r.labels[1:]) for r in rows):
        raise InvalidRequestError(
            f"an assistant turn falls beyond --max-length {max_length} tokens in some "
            "conversations: raise --max-length or shorten them",
            param="max_length",
        )
    return rows


def _with_adapters(model: Any, args: argparse.Namespace) -> Any:
    """``model`` wrapped by peft with trainable LoRA adapters (the rest frozen)."""
    import peft

    config = peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=_targets(args.target_modules), task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # peft: target modules not found, ...
        raise InvalidRequestError(
            f"cannot add LoRA adapters: {exc}", param="target_modules"
        ) from exc


def _loss_metrics(
    before: float, after: float, examples: int, tokens: int, digest: str
) -> list[MetricRecord]:
    return [
        metric("loss", after, digest),
        metric("perplexity", math.exp(after), digest),
        metric("parent_loss", before, digest),
        metric("parent_perplexity", math.exp(before), digest),
        metric("loss_delta", after - before, digest),
        metric("held_out_examples", examples, digest),
        metric("held_out_tokens", tokens, digest),
    ]


def base_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in (``config.json``), float32 if it says none."""
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _targets(value: str) -> str | list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["all-linear"]:
        return "all-linear"
    if not names:
        raise InvalidRequestError("--target-modules names no module", param="target_modules")
    return names


def _is_weights(relative: Path) -> bool:
    name = relative.name
    return name.endswith((".safetensors", ".bin", ".pt")) or name in {
        "config.json", "generation_config.json", "model.safetensors.index.json",
    }  # fmt: skip


def _parameters(
    args: argparse.Namespace, chats: datasets.Chats, result: FitResult, trainable: int
) -> dict[str, Any]:
    return {
        "data": chats.source,
        "examples": len(chats.conversations),
        "method": "lora (peft), merged",
        "rank": args.rank,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "target_modules": args.target_modules,
        "trainable_parameters": trainable,
        "epochs": args.epochs,
        "patience": args.patience,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "val_split": args.val_split,
        "test_split": args.test_split,
        "seed": args.seed,
        "best_epoch": result.best_epoch,
        "best_val_loss": round(result.best_val_loss, 6),
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
    }


def add_parser(commands: Any, common: Any) -> None:
    """The ``chat-lora`` sub-command's arguments."""
    lora = commands.add_parser("chat-lora")
    lora.add_argument("--data", required=True)
    lora.add_argument("--base", required=True)
    lora.add_argument("--max-length", type=int, default=512)
    lora.add_argument("--rank", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--dropout", type=float, default=0.05)
    lora.add_argument("--target-modules", default="all-linear")
    common(lora, epochs=3, lr=2e-4, batch_size=4)
    lora.set_defaults(test_split=0.1)
