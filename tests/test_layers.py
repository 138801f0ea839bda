"""Tests for siglip_dola.layers: buckets, candidate layers, validation of explicit layers."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from siglip_dola.layers import bucket_ranges, resolve_layers


@pytest.mark.parametrize("n_buckets, expected", [
    (3, [(1, 8), (9, 16), (17, 24)]),
    (2, [(1, 12), (13, 24)]),
    (4, [(1, 6), (7, 12), (13, 18), (19, 24)]),
])
def test_bucket_ranges_vit_l16(n_buckets, expected):
    assert bucket_ranges(24, n_buckets) == expected


@pytest.mark.parametrize("bucket, expected", [(1, [2, 4, 6, 8]), (2, [10, 12, 14, 16]), (3, [18, 20, 22])])
def test_three_buckets_even_candidates_exclude_final_layer(bucket, expected):
    assert resolve_layers(24, bucket=bucket) == expected


def test_two_and_four_buckets_candidates():
    assert resolve_layers(24, bucket=2, n_buckets=2) == [14, 16, 18, 20, 22]
    assert resolve_layers(24, bucket=4, n_buckets=4) == [20, 22]
    assert resolve_layers(24, bucket=1, n_buckets=4) == [2, 4, 6]


def test_parity_odd_and_all():
    assert resolve_layers(24, bucket=3, parity="odd") == [17, 19, 21, 23]
    assert resolve_layers(24, bucket=3, parity="all") == list(range(17, 24))


@given(num_layers=st.integers(2, 64), data=st.data())
@settings(max_examples=60, deadline=None)
def test_uneven_split_matches_numpy_array_split(num_layers, data):
    n_buckets = data.draw(st.integers(1, num_layers))
    ranges = bucket_ranges(num_layers, n_buckets)
    reference = np.array_split(np.arange(1, num_layers + 1), n_buckets)
    assert ranges == [(int(chunk[0]), int(chunk[-1])) for chunk in reference]


@given(num_layers=st.integers(2, 48), data=st.data())
@settings(max_examples=60, deadline=None)
def test_all_parity_buckets_cover_every_candidate_once(num_layers, data):
    n_buckets = data.draw(st.integers(1, num_layers))
    covered = []
    for bucket in range(1, n_buckets + 1):
        first, last = bucket_ranges(num_layers, n_buckets)[bucket - 1]
        if first == last == num_layers:  # a bucket holding only the final layer has no candidate
            with pytest.raises(ValueError, match="bucket"):
                resolve_layers(num_layers, bucket=bucket, n_buckets=n_buckets, parity="all")
            continue
        covered += resolve_layers(num_layers, bucket=bucket, n_buckets=n_buckets, parity="all")
    assert covered == list(range(1, num_layers))


def test_explicit_layers_kept_in_order():
    assert resolve_layers(24, layers=[22, 18, 20]) == [22, 18, 20]
    assert resolve_layers(24, layers=(np.int64(3),)) == [3]


@pytest.mark.parametrize("layers", [[0], [24], [25], [-1, 2]])
def test_explicit_out_of_range_states_valid_range(layers):
    with pytest.raises(ValueError, match=r"1\.\.23"):
        resolve_layers(24, layers=layers)


@pytest.mark.parametrize("layers, error", [
    ([2, 2], ValueError), ([], ValueError), ([True], TypeError), ([2.0], TypeError), ("12", TypeError), (5, TypeError),
])
def test_explicit_bad_layers_raise_naming_layers(layers, error):
    with pytest.raises(error, match="layers"):
        resolve_layers(24, layers=layers)


def test_exactly_one_of_layers_or_bucket():
    with pytest.raises(ValueError, match="exactly one"):
        resolve_layers(24)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_layers(24, layers=[2], bucket=1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(bucket=0), "bucket"), (dict(bucket=4), "bucket"), (dict(bucket=1, n_buckets=0), "n_buckets"),
    (dict(bucket=1, n_buckets=25), "n_buckets"), (dict(bucket=1, parity="prime"), "parity"),
    (dict(bucket=True), "bucket"),
])
def test_bad_bucket_arguments_named(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        resolve_layers(24, **kwargs)


@pytest.mark.parametrize("num_layers", [1, 0, 2.5, True])
def test_bad_num_layers_named(num_layers):
    with pytest.raises((ValueError, TypeError), match="num_layers"):
        bucket_ranges(num_layers, 1)
