"""Encoders run on packed rows: no padding in the linear layers.

A dynamic batch of sentences of different lengths padded to the longest spends the padded
positions' share of every linear layer for nothing (a batch of 32 rows of 8-64 tokens is often
a third padding). Here the rows are concatenated into one sequence of ``T`` real tokens: the
embeddings, the linear layers, the layer norms and the activations run on ``[1, T, hidden]``
(each token exactly once), and only attention, which must not mix rows, sees them apart: each
layer's queries, keys and values are gathered into padded ``[rows, heads, longest, dim]``
views, a few rows of similar length at a time (``GROUP_ROWS``), for masked SDPA calls and
scattered back (attention is a small part of an encoder's work at these lengths; the gathers
are memory copies of ``T`` rows).

It plugs into the model through transformers' attention interface (the model's own modules,
weights and activations run unchanged), so it applies to the encoder families whose only
cross-token operation is that attention call and whose position ids are plain per-row ranges:
``PACKED_FAMILIES``. Any other model (or an option ``packed: "false"``) runs padded as before.
Results equal the padded forward to float rounding (tests compare both and
sentence-transformers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmaas.core.errors import ModelLoadError

_log = logging.getLogger(__name__)

ATTENTION = "lmaas_packed"
"""The name the packed attention is registered under in transformers."""

# model_type -> offset of the first position id (RoBERTa-style models count positions from
# padding_idx + 1).
PACKED_FAMILIES: dict[str, str] = {
    "bert": "zero",
    "roberta": "after_padding",
    "xlm-roberta": "after_padding",
    "camembert": "after_padding",
    "electra": "zero",
}


def packed_option(options: Mapping[str, str]) -> bool:
    """The serving option ``packed`` (default true). Raises: ModelLoadError."""
    raw = options.get("packed", "true").strip().lower()
    if raw not in ("true", "false"):
        raise ModelLoadError(f"option packed={raw[:20]!r} must be true or false")
    return raw == "true"


GROUP_ROWS = 8
"""Rows per attention group (rows sorted by length): each group is padded only to its own
longest row. Measured on a 32-row MiniLM batch of 10-64 tokens: groups of 8 take attention
from ~2.3-4.8 ms to ~1.6 ms per layer against one group padded to the batch's longest."""


@dataclass(frozen=True, slots=True)
class _Group:
    """Rows of similar length that attend in one padded SDPA call."""

    rows: int
    longest: int
    gather: torch.Tensor
    """``[rows * longest]``: the packed token at each padded slot (padding slots: token 0)."""
    key_mask: torch.Tensor
    """``[rows, 1, 1, longest]`` bool: True where a key is a real token."""
    real: torch.Tensor
    """Padded slots that hold a real token."""
    tokens: torch.Tensor | None
    """The packed index of each of those tokens (same order); None when the group holds every
    token in packed order (``real`` is then the packing's ``flat_index``)."""


@dataclass(frozen=True, slots=True)
class Packing:
    """Where each packed token sits: in the padded ``[rows, longest]`` view (pooling) and in
    the attention groups."""

    lengths: tuple[int, ...]
    longest: int
    flat_index: torch.Tensor
    """``[T]``: row * longest + position of every packed token."""
    key_mask: torch.Tensor
    """``[rows, 1, 1, longest]`` bool: True where a key is a real token."""
    groups: tuple[_Group, ...]
    starts: torch.Tensor
    """``[rows]``: the packed index of each row's first token."""

    @property
    def rows(self) -> int:
        return self.key_mask.shape[0]  # no int(): a symbolic size while exporting

    @property
    def tokens(self) -> int:
        return self.flat_index.shape[0]  # no int(): a symbolic size while exporting

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[T, ...]`` → ``[rows, longest, ...]`` with zeros at padded positions."""
        out = packed.new_zeros((self.rows * self.longest, *packed.shape[1:]))
        out.index_copy_(0, self.flat_index, packed)
        return out.view(self.rows, self.longest, *packed.shape[1:])

    def firsts(self, packed: torch.Tensor) -> torch.Tensor:
        """``[T, ...]`` → ``[rows, 1, ...]``: each row's first token (what classification heads
        read: ``[CLS]`` / ``<s>``)."""
        return packed.index_select(0, self.starts).unsqueeze(1)

    def mask(self) -> torch.Tensor:
        """``[rows, longest]`` int64, 1 on real tokens (the padded forward's attention mask)."""
        return self.key_mask.view(self.rows, self.longest).to(torch.int64)


def make_packing(
    lengths: Sequence[int], device: torch.device, group_rows: int = GROUP_ROWS
) -> Packing:
    counts = torch.tensor(list(lengths), dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    longest = int(counts.max())
    flat = torch.repeat_interleave(torch.arange(len(lengths)) * longest, counts) + _ranges(counts)
    key_mask = torch.arange(longest).unsqueeze(0) < counts.unsqueeze(1)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = []
    for first in range(0, len(order), group_rows):
        rows = torch.tensor(order[first : first + group_rows])
        n, width = len(rows), int(counts[rows].max())
        slots = torch.arange(width).unsqueeze(0).expand(n, width)
        real = slots < counts[rows].unsqueeze(1)
        at = starts[rows].unsqueeze(1) + slots
        groups.append(
            _Group(
                rows=n,
                longest=width,
                gather=torch.where(real, at, 0).reshape(-1).to(device),
                key_mask=real.view(n, 1, 1, width).to(device),
                real=torch.nonzero(real.reshape(-1)).squeeze(1).to(device),
                tokens=at[real].to(device),
            )
        )
    return Packing(
        lengths=tuple(int(n) for n in lengths),
        longest=longest,
        flat_index=flat.to(device),
        key_mask=key_mask.view(len(lengths), 1, 1, longest).to(device),
        groups=tuple(groups),
        starts=starts.to(device),
    )


def _ranges(counts: torch.Tensor) -> torch.Tensor:
    """``[0..n0), [0..n1), ...`` concatenated."""
    total = int(counts.sum())
    offsets = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.arange(total, dtype=torch.int64) - offsets


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over ``[1, heads, T, dim]`` packed tensors;
    the :class:`Packing` comes in ``kwargs["lmaas_packing"]``. Returns ``[1, T, heads, dim]``."""
    packing: Packing | None = kwargs.get("lmaas_packing")
    if packing is None:  # not a packed call (e.g. a warm-up through the plain forward)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    heads, dim = query.shape[1], query.shape[3]
    total = packing.tokens
    # [1, h, T, d] views of the projections' [T, h * d] outputs: back to rows of tokens.
    q, k, v = (x[0].transpose(0, 1).reshape(total, heads * dim) for x in (query, key, value))
    out = q.new_empty((total, heads * dim))
    for group in packing.groups:

        def padded(x: torch.Tensor, g: _Group = group) -> torch.Tensor:
            return x.index_select(0, g.gather).view(g.rows, g.longest, heads, dim).transpose(1, 2)

        attended = torch.nn.functional.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), attn_mask=group.key_mask, scale=scaling
        )  # [rows, h, longest, d]
        flat = attended.transpose(1, 2).reshape(group.rows * group.longest, heads * dim)
        if group.tokens is None:  # one group, rows in packed order (an exported graph)
            return flat.index_select(0, group.real).view(1, total, heads, dim), None
        out.index_copy_(0, group.tokens, flat.index_select(0, group.real))
    return out.view(1, total, heads, dim), None


def graph_packing(
    gather: torch.Tensor, key_mask: torch.Tensor, flat_index: torch.Tensor
) -> Packing:
    """The packing of an exported graph, from its inputs: one attention group of every row in
    packed order (an ONNX graph has no per-batch Python loop), padded to the longest row.

    Args:
        gather: ``[rows, longest]`` int64: the packed token at each padded slot (pads: 0).
        key_mask: ``[rows, longest]`` bool: True on real tokens.
        flat_index: ``[T]`` int64: the padded slot (``row * longest + position``) of each
            packed token.
    """
    rows, longest = key_mask.shape[0], key_mask.shape[1]
    mask = key_mask.view(rows, 1, 1, longest)
    group = _Group(
        rows=rows, longest=longest, gather=gather.reshape(-1), key_mask=mask, real=flat_index,
        tokens=None,
    )  # fmt: skip
    return Packing(
        lengths=(), longest=longest, flat_index=flat_index, key_mask=mask, groups=(group,),
        starts=flat_index[:0],
    )  # fmt: skip


def graph_inputs(lengths: Sequence[int]) -> dict[str, torch.Tensor]:
    """``gather``, ``key_mask``, ``flat_index`` for rows of ``lengths`` in packed order (what
    :func:`graph_packing` reads)."""
    counts = torch.tensor(list(lengths), dtype=torch.int64)
    longest = int(counts.max())
    slots = torch.arange(longest).unsqueeze(0)
    key_mask = slots < counts.unsqueeze(1)
    gather = torch.where(key_mask, (torch.cumsum(counts, 0) - counts).unsqueeze(1) + slots, 0)
    flat = torch.repeat_interleave(torch.arange(len(lengths)) * longest, counts) + _ranges(counts)
    return {"gather": gather, "key_mask": key_mask, "flat_index": flat}


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    # Masks as for SDPA: a packed call has no padding mask (so none is built), a plain padded
    # call through the same model gets its usual one.
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


_FIRST_TOKEN_HEADS = frozenset(
    {
        "RobertaForSequenceClassification",
        "XLMRobertaForSequenceClassification",
        "CamembertForSequenceClassification",
        "ElectraForSequenceClassification",
    }
)


PACKED_HEADS = _FIRST_TOKEN_HEADS | {"BertForSequenceClassification"}
"""Sequence-classification classes whose head :func:`classification_head` runs on packed rows."""


def classification_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The head of a sequence-classification model as a function of each row's first token
    ``[rows, 1, hidden]`` → logits, or None where it is not known to read only that token."""
    name = type(model).__name__
    if name == "BertForSequenceClassification":
        bert, dropout, classifier = model.bert, model.dropout, model.classifier
        if bert.pooler is None:
            return None
        return lambda first: classifier(dropout(bert.pooler(first)))
    if name in _FIRST_TOKEN_HEADS:
        return model.classifier  # type: ignore[no-any-return]
    return None


def first_position(model_type: str | None, pad_token_id: int | None) -> int:
    """The position id of a row's first token: 0, or ``pad_token_id + 1`` for the RoBERTa-style
    families (their position table starts after the padding index)."""
    if model_type is not None and PACKED_FAMILIES.get(model_type) == "after_padding":
        return int(pad_token_id or 0) + 1
    return 0


class PackedEncoder:
    """Runs a transformers encoder on packed rows; see the module docstring.

    Args:
        model: A loaded transformers encoder (``AutoModel`` or a head model) of a family in
            ``PACKED_FAMILIES``.
    """

    def __init__(self, model: Any) -> None:
        _register()
        config = model.config
        self._model = model
        self._first_position = first_position(config.model_type, config.pad_token_id)
        model.set_attn_implementation(ATTENTION)

    @staticmethod
    def supports(model: Any) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in PACKED_FAMILIES and not getattr(
            config, "is_decoder", False
        )

    def hidden(
        self, rows: Sequence[Sequence[int]], token_types: Sequence[Sequence[int]] | None = None
    ) -> tuple[torch.Tensor, Packing]:
        """The last hidden state of each token, ``[T, hidden]``, and the packing."""
        device = next(self._model.parameters()).device
        lengths = [len(r) for r in rows]
        packing = make_packing(lengths, device)
        ids = torch.tensor([i for r in rows for i in r], dtype=torch.int64).unsqueeze(0)
        positions = _ranges(torch.tensor(lengths)) + self._first_position
        # Token types always given: the model's default buffer is only max_positions long.
        if token_types is None:
            types = torch.zeros_like(ids)
        else:
            types = torch.tensor([t for r in token_types for t in r], dtype=torch.int64)
            types = types.unsqueeze(0)
        out = self._model(
            input_ids=ids.to(device),
            position_ids=positions.unsqueeze(0).to(device),
            token_type_ids=types.to(device),
            lmaas_packing=packing,
        )
        return out.last_hidden_state[0], packing
