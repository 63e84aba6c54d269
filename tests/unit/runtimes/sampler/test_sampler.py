"""The batched sampler: greedy, seeds, truncation, penalties, bans, logprobs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from sampler_refs import VOCAB, random_logits, reference_processed, slot

from lmaas.runtimes.llm.batch import SamplingConfig
from lmaas.runtimes.llm.sampler import MIN_LOGPROB, Sampler
from lmaas.runtimes.llm.sampling_kernels import block_argmax, block_topk, inverse_cdf

CPU = torch.device("cpu")
GREEDY = SamplingConfig(temperature=0.0)


def _sample(logits: torch.Tensor, slots: list, sampler: Sampler | None = None) -> list[int]:
    sampler = sampler or Sampler(CPU)
    return [s.token_id for s in sampler.sample(logits.clone(), slots)]


def test_greedy_equals_argmax_including_odd_vocab() -> None:
    logits = random_logits(8)
    assert _sample(logits, [slot(i, GREEDY) for i in range(8)]) == logits.argmax(-1).tolist()
    odd = torch.randn(5, 1001)
    odd[2, 1000] = 100.0
    assert block_argmax(odd).tolist() == odd.argmax(-1).tolist()


def test_top_k_one_is_greedy() -> None:
    logits = random_logits(6, seed=1)
    config = SamplingConfig(temperature=1.3, top_k=1)
    assert _sample(logits, [slot(i, config) for i in range(6)]) == logits.argmax(-1).tolist()


def test_seeded_rows_ignore_neighbours_and_batch_composition() -> None:
    row = random_logits(1, seed=2)[0]
    seeded = SamplingConfig(temperature=1.0, top_p=0.9, seed=1234)
    alone = [_sample(row[None], [slot(0, seeded, history=[1] * (3 + t))])[0] for t in range(20)]
    crowd = random_logits(7, seed=3)
    others = [
        SamplingConfig(temperature=0.7),
        GREEDY,
        SamplingConfig(temperature=1.0, seed=9, top_k=5),
    ]
    sampler = Sampler(CPU)
    for t in range(20):
        batch = torch.cat([crowd[:3], row[None], crowd[3:]])
        slots = [slot(10 + i, others[i % 3]) for i in range(7)]
        slots.insert(3, slot(0, seeded, history=[1] * (3 + t)))
        assert _sample(batch, slots, sampler)[3] == alone[t]
    assert len(set(alone)) > 1, "successive positions must draw different randomness"


def test_seeded_draws_survive_free_and_recompute() -> None:
    row = random_logits(1, seed=4)
    config = SamplingConfig(temperature=1.0, seed=5)
    sampler = Sampler(CPU)
    first = _sample(row, [slot(0, config, history=[1, 2, 3, 4])], sampler)
    sampler.free([0])
    assert _sample(row, [slot(0, config, history=[1, 2, 3, 4])], sampler) == first


def _empirical(config: SamplingConfig, logits: torch.Tensor, draws: int = 400) -> Counter[int]:
    sampler = Sampler(CPU)
    counts: Counter[int] = Counter()
    batch = logits.expand(draws, -1).contiguous()
    slots = [slot(i, SamplingConfig(**{**_fields(config), "seed": i})) for i in range(draws)]
    counts.update(_sample(batch, slots, sampler))
    return counts


def _fields(config: SamplingConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in SamplingConfig.__dataclass_fields__}


def test_top_k_restricts_support() -> None:
    logits = random_logits(1, seed=5, scale=1.0)[0]
    counts = _empirical(SamplingConfig(temperature=1.0, top_k=7), logits)
    assert set(counts) <= set(logits.topk(7).indices.tolist())
    assert len(counts) == 7


def test_top_p_restricts_support_to_the_nucleus() -> None:
    logits = random_logits(1, seed=6, scale=2.0)[0]
    probs = torch.softmax(logits, -1)
    ordered = probs.sort(descending=True)
    mass_before = ordered.values.cumsum(-1) - ordered.values
    nucleus = set(ordered.indices[mass_before < 0.5].tolist())
    counts = _empirical(SamplingConfig(temperature=1.0, top_p=0.5), logits, draws=600)
    assert set(counts) <= nucleus
    assert len(counts) >= len(nucleus) // 2


def test_min_p_restricts_support() -> None:
    logits = random_logits(1, seed=7, scale=2.0)[0]
    probs = torch.softmax(logits, -1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero().squeeze(1).tolist())
    counts = _empirical(SamplingConfig(temperature=1.0, min_p=0.2), logits)
    assert set(counts) <= allowed


def test_sampling_follows_the_distribution() -> None:
    logits = torch.full((VOCAB,), -30.0)
    logits[[10, 20, 30]] = torch.tensor([0.0, 1.0, 2.0])
    counts = _empirical(SamplingConfig(temperature=1.0), logits, draws=2000)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1) * 2000
    for token_id, want in zip([10, 20, 30], expected.tolist(), strict=True):
        assert abs(counts[token_id] - want) < 5 * want**0.5


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.0, logit_bias=((5, 50.0), (7, -3.0))),
        SamplingConfig(temperature=0.0, repetition_penalty=1.7),
        SamplingConfig(temperature=0.0, presence_penalty=0.8, frequency_penalty=0.6),
        SamplingConfig(
            temperature=0.0,
            repetition_penalty=0.8,
            presence_penalty=-0.5,
            frequency_penalty=1.5,
            logit_bias=((3, 2.0),),
        ),
    ],
)
def test_processors_match_reference(config: SamplingConfig) -> None:
    logits = random_logits(4, seed=8)
    slots = [
        slot(i, config, history=[5, 3, 3, 9, 9, 9, 100 + i, 5], num_prompt=3) for i in range(4)
    ]
    sampler = Sampler(CPU)
    processed = logits.clone()
    sampler._process(processed, slots, _plan(slots))
    for i, s in enumerate(slots):
        torch.testing.assert_close(processed[i], reference_processed(logits[i], s))
    expected = [int(reference_processed(logits[i], s).argmax()) for i, s in enumerate(slots)]
    assert _sample(logits, slots) == expected


def _plan(slots: list) -> object:
    from lmaas.runtimes.llm.sampler import _Plan

    return _Plan.of(slots)


def test_banned_ids_are_never_sampled() -> None:
    logits = random_logits(1, seed=9, scale=1.0)[0]
    banned = frozenset(logits.topk(5).indices.tolist())
    sampler = Sampler(CPU)
    batch = logits.expand(300, -1).contiguous()
    slots = [slot(i, SamplingConfig(temperature=2.0), banned=banned) for i in range(300)]
    assert not banned & set(_sample(batch, slots, sampler))
    greedy = [slot(0, GREEDY, banned=banned)]
    assert _sample(logits[None], greedy)[0] not in banned


def test_logprobs_match_log_softmax() -> None:
    logits = random_logits(3, seed=10)
    configs = [
        SamplingConfig(temperature=0.0, num_logprobs=0),
        SamplingConfig(temperature=0.5, num_logprobs=4, logit_bias=((1, 5.0),)),
        SamplingConfig(temperature=1.0),
    ]
    slots = [slot(i, c) for i, c in enumerate(configs)]
    results = Sampler(CPU).sample(logits.clone(), slots)
    expected = torch.log_softmax(logits, -1)
    biased = logits[1].clone()
    biased[1] += 5.0
    expected[1] = torch.log_softmax(biased, -1)
    first, second, third = results
    assert first.logprob == pytest.approx(float(expected[0, first.token_id]), abs=1e-5)
    assert first.top_logprobs is None
    assert second.logprob == pytest.approx(float(expected[1, second.token_id]), abs=1e-5)
    assert second.top_logprobs is not None
    top = expected[1].topk(4)
    assert [t for t, _ in second.top_logprobs] == top.indices.tolist()
    assert [v for _, v in second.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert third.logprob is None


def test_logprobs_of_masked_ids_stay_finite() -> None:
    logits = random_logits(1, seed=11)
    banned = frozenset(range(1, VOCAB))
    config = SamplingConfig(temperature=0.0, num_logprobs=3)
    result = Sampler(CPU).sample(logits.clone(), [slot(0, config, banned=banned)])[0]
    assert result.token_id == 0
    assert result.top_logprobs is not None
    assert [v for _, v in result.top_logprobs][1:] == [MIN_LOGPROB, MIN_LOGPROB]


def test_kernels_edge_cases() -> None:
    weights = torch.zeros(3, 1000)
    weights[0, 999] = 1.0
    weights[1, 0] = 1.0
    weights[2, 500:502] = 1.0
    ones = torch.ones(3)
    tiny = torch.full((3,), 1e-12)
    assert inverse_cdf(weights, ones).tolist() == [999, 0, 501]
    assert inverse_cdf(weights, tiny).tolist() == [999, 0, 500]
    x = torch.randn(4, 5000)
    values, ids = block_topk(x, 6)
    assert torch.equal(values, x.topk(6).values)
    assert torch.equal(ids, x.topk(6).indices)
