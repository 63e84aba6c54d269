"""k-fold cuts of the train+validation examples (lmaas train --k-fold)."""

from __future__ import annotations

import pytest

from lmaas.core.errors import InvalidRequestError
from lmaas.lifecycle.data import k_folds


def test_every_example_is_held_out_exactly_once() -> None:
    pool = [7, 3, 9, 1, 4, 8, 2, 6, 0, 5, 11]
    folds = k_folds(pool, 3, val_fraction=0.2)
    assert len(folds) == 3
    held = [i for _, _, held_out in folds for i in held_out]
    assert sorted(held) == sorted(pool)
    assert [len(h) for _, _, h in folds] == [4, 4, 3]
    for train, val, held_out in folds:
        assert sorted(train + val + held_out) == sorted(pool)
        assert not set(held_out) & set(train + val)
        assert len(val) == round(len(train + val) * 0.2) and train


def test_validation_keeps_at_least_one_example() -> None:
    for train, val, _ in k_folds(list(range(6)), 2, val_fraction=0.01):
        assert len(val) == 1 and len(train) == 2


@pytest.mark.parametrize(("count", "k", "message"), [(10, 1, "k >= 2"), (5, 2, "too few")])
def test_bad_folds_are_refused(count: int, k: int, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        k_folds(list(range(count)), k, val_fraction=0.2)
