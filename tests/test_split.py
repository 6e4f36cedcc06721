"""The split is by star, reproducible, and depends only on its own seed."""

import numpy as np
import pytest

from stellarlab.data.split import resolve_split_sizes, split_by_star
from stellarlab.errors import ConfigError


def test_split_by_star_keeps_each_star_on_one_side():
    star_id = np.repeat(np.arange(300), 3)  # three visits per star
    parts = split_by_star(star_id, [0.8, 0.1, 0.1], seed=17)
    stars = [set(star_id[p]) for p in parts]
    assert not (stars[0] & stars[1]) and not (stars[0] & stars[2]) and not (stars[1] & stars[2])
    assert sum(len(p) for p in parts) == len(star_id)
    assert [len(s) for s in stars] == [240, 30, 30]
    for p in parts:  # a star's visits travel together
        assert all(np.sum(star_id[p] == s) == 3 for s in set(star_id[p]))


def test_split_is_reproducible_and_seed_dependent():
    star_id = np.arange(1000)
    a = split_by_star(star_id, [0.7, 0.15, 0.15], seed=1)
    b = split_by_star(star_id, [0.7, 0.15, 0.15], seed=1)
    c = split_by_star(star_id, [0.7, 0.15, 0.15], seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.sort(a[2]), np.sort(c[2]))


def test_split_counts():
    parts = split_by_star(np.arange(2000), [1024, 256, 512], seed=17)
    assert [len(p) for p in parts] == [1024, 256, 512]


@pytest.mark.parametrize(
    "sizes, match",
    [([0.5, 0.3, 0.3], "sum to"), ([0.8, 0.2], "3 entries"), ([900, 200, 100], "asks for 1200"), ([1.0, 0.0, 0.0], "validation")],
)
def test_bad_split_sizes_are_explained(sizes, match):
    with pytest.raises(ConfigError, match=match):
        resolve_split_sizes(sizes, 1000)
