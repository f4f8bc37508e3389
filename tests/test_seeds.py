"""Stable seeds: one rule for training's batch/noise seeds and class images' seeds."""

from __future__ import annotations

from dbtools.core.seeds import derived_seed
from dbtools.train.classgen import image_seed
from dbtools.train.data import step_seed


def test_seeds_are_the_ones_earlier_versions_drew():
    # Pinned: a changed value would change a resumed run's batches and noise, and the
    # class images generated for missing indices.
    assert [step_seed(1337, 0, "noise"), step_seed(1337, 41, "batch"), step_seed(7, 2)] == [
        2065187880314970210, 2509061708020908639, 8493662865487489759]
    assert step_seed(0, 3, "crop:caf\udce9.png") == 8310061462550110237  # a name that is not UTF-8
    assert [image_seed(1337, "a photo of a dog", 0), image_seed(1337, "a photo of a dog", 199),
            image_seed(0, "", 5)] == [4154888420169913362, 6382395749745673716, 5800314764726183884]


def test_both_come_from_the_one_rule():
    assert step_seed(5, 6, "batch") == derived_seed(5, 6, "batch")
    assert image_seed(5, "a dog", 6) == derived_seed(5, "a dog", 6, sep="\0", byteorder="big")
    seeds = {derived_seed(1, 0), derived_seed(1, 1), derived_seed(2, 0), derived_seed(1, 0, byteorder="big")}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
