from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from flasktop.model.sketch import Sketch, histogram_of

QS = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
values = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6, allow_nan=False))


def exact(xs: list, q: float) -> float:
    s = sorted(xs)
    return s[math.floor(q * (len(s) - 1))]


def within(est: float, true: float, a: float) -> bool:
    if true <= 1e-6:
        return est <= 1e-6
    return abs(est - true) <= a * true * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(st.lists(values, min_size=1, max_size=400))
def test_quantiles_within_relative_accuracy(xs: list) -> None:
    sk = Sketch(0.01)
    for x in xs:
        sk.add(x)
    assert sk.count == len(xs)
    for q, est in zip(QS, sk.quantiles(QS)):
        assert est is not None
        assert within(est, exact(xs, q), 0.01), (q, est, exact(xs, q))


@settings(max_examples=80, deadline=None)
@given(st.lists(values, min_size=1, max_size=200), st.lists(values, min_size=1, max_size=200))
def test_merge_equals_one_sketch_of_everything(a: list, b: list) -> None:
    sa, sb, sall = Sketch(0.01), Sketch(0.01), Sketch(0.01)
    for x in a:
        sa.add(x)
        sall.add(x)
    for x in b:
        sb.add(x)
        sall.add(x)
    sa.merge(sb)
    assert sa.buckets == sall.buckets
    assert sa.count == sall.count and sa.max == sall.max
    for q, est in zip(QS, sa.quantiles(QS)):
        assert within(est, exact(a + b, q), 0.01)


def test_bucket_count_is_bounded_and_high_quantiles_keep_their_guarantee() -> None:
    sk = Sketch(0.01, max_buckets=64)
    xs = [1.0001 ** i * 1e-5 for i in range(0, 200_000, 7)]  # ten decades: far more than 64 buckets
    for x in xs:
        sk.add(x)
    assert len(sk.buckets) <= 64
    assert within(sk.quantile(0.99), exact(xs, 0.99), 0.01)
    assert sk.quantile(1.0) == max(xs)


def test_garbage_values_are_ignored() -> None:
    sk = Sketch()
    for x in (float("nan"), float("inf"), -1.0):
        sk.add(x)
    assert sk.count == 0 and sk.quantile(0.5) is None


def test_histogram_counts_everything_in_increasing_bins() -> None:
    sk = Sketch()
    xs = [0.0] + [0.001 * (i + 1) for i in range(999)]
    for x in xs:
        sk.add(x)
    hist = histogram_of(sk.buckets, 12, sk)
    assert sum(c for _, c in hist) == len(xs)
    assert len(hist) <= 12
    bounds = [ub for ub, _ in hist]
    assert bounds == sorted(bounds) and bounds[-1] >= 0.999
