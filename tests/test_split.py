"""`--validation_split`: which instance images are held out for the validation loss."""

from __future__ import annotations

import pytest

from dbtools.dataset.split import ValidationSplitError, validation_split


def test_validation_split_is_deterministic_disjoint_and_order_free(tmp_path):
    images = [tmp_path / f"img_{i:02}.png" for i in range(20)]
    train, held = validation_split(images, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(images)
    assert train == [p for p in images if p in set(train)]  # input order kept
    _, again_held = validation_split(list(reversed(images)), 0.1, seed=0)
    assert set(again_held) == set(held)
    moved = validation_split([tmp_path / "elsewhere" / p.name for p in images], 0.1, seed=0)[1]
    assert {p.name for p in moved} == {p.name for p in held}
    assert set(validation_split(images, 0.1, seed=1)[1]) != set(held)


def test_validation_split_edges(tmp_path):
    two = [tmp_path / "a.png", tmp_path / "b.png"]
    assert validation_split(two, 0.0) == (two, [])
    train, held = validation_split(two, 0.9)
    assert len(train) == 1 and len(held) == 1  # at least one image is left to train on
    assert len(validation_split(two * 1, 0.01)[1]) == 1  # at least one held out
    for bad in (-0.1, 1.0):
        with pytest.raises(ValidationSplitError, match="--validation_split"):
            validation_split(two, bad)
    with pytest.raises(ValidationSplitError, match="at least 2"):
        validation_split(two[:1], 0.1)
