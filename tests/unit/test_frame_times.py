"""Frame-time sampler: every clip of small lattices with its exact probability (against an enumeration of the
documented algorithm), statistics of the real random draws over 10k clips, and hand cases."""

import math
from fractions import Fraction

import pytest
import torch

from animate124.core.render import frame_times
from animate124.core.render.frame_times import eval_times, sample_frame_times, stride_probabilities

N_DRAWS = 10_000


@pytest.fixture(scope="module")
def draws():
    g = torch.Generator().manual_seed(0)
    return [sample_frame_times(generator=g) for _ in range(N_DRAWS)]


def _binomial_tol(p: float, n: int = N_DRAWS, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_start_from_zero_rate_is_zero_rate_times_no_mirror(draws):
    # P(flag) = 0.2 * 0.5 = 0.1; a flagged clip starts exactly at 0
    rate = sum(d.start_from_zero for d in draws) / N_DRAWS
    assert abs(rate - 0.1) < _binomial_tol(0.1), rate
    assert all(d.times[0].item() == 0.0 for d in draws if d.start_from_zero)


def test_mirror_rate_and_clip_ending_at_one(draws):
    mirror_rate = sum(d.mirrored for d in draws) / N_DRAWS
    assert abs(mirror_rate - 0.5) < _binomial_tol(0.5)
    # ends at exactly 1 <=> mirrored and start 0: P = 0.5 * (0.2 + 0.8 * sum_k P(k) / (P - 16 k + 1)) = 0.1071
    q = sum(p / (256 - 16 * k + 1) for k, p in stride_probabilities(16, 256).items())
    expected = 0.5 * (0.2 + 0.8 * q)
    assert expected == pytest.approx(0.1071, abs=1e-4)
    ends_at_one = sum(d.times[-1].item() == 1.0 for d in draws) / N_DRAWS
    assert abs(ends_at_one - expected) < _binomial_tol(expected)
    assert not any(d.start_from_zero for d in draws if d.mirrored)


def test_stride_distribution_matches_16_over_241(draws):
    exact = stride_probabilities(16, 256)
    assert exact == {**{k: 16 / 241 for k in range(1, 16)}, 16: 1 / 241}
    for k, p in exact.items():
        freq = sum(d.stride == k for d in draws) / N_DRAWS
        assert abs(freq - p) < _binomial_tol(p), (k, freq, p)


def test_times_increase_in_unit_interval_with_spacing_k_over_p(draws):
    times = torch.stack([d.times for d in draws])  # [10000, 16]
    strides = torch.tensor([d.stride for d in draws], dtype=torch.float32)
    assert times.shape == (N_DRAWS, 16) and times.dtype == torch.float32
    assert times.min().item() >= 0.0 and times.max().item() <= 1.0
    # float32 of lattice values j/256 is exact, so the spacing is exactly k/256 and times strictly increase
    torch.testing.assert_close(times.diff(dim=1), (strides / 256)[:, None].expand(N_DRAWS, 15), rtol=0, atol=0)
    # the clip fits: first index + 15 k <= 256
    assert ((times[:, 0] * 256 + 15 * strides) <= 256).all()


def test_seeded_draws_are_reproducible_and_hand_case():
    a = sample_frame_times(generator=torch.Generator().manual_seed(7))
    b = sample_frame_times(generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.times, b.times) and (a.stride, a.start, a.mirrored) == (b.stride, b.start, b.mirrored)
    # forced start at 0, no mirror, F = 4, P = 4 -> span 4, stride 1: times 0, 1/4, 2/4, 3/4
    c = sample_frame_times(num_frames=4, precision=4, zero_rate=1.0, mirror_prob=0.0)
    assert torch.equal(c.times, torch.tensor([0.0, 0.25, 0.5, 0.75])) and c.start_from_zero and c.stride == 1
    # always mirrored: 1 - t reversed -> 1/4, 2/4, 3/4, 1 and the flag cleared
    m = sample_frame_times(num_frames=4, precision=4, zero_rate=1.0, mirror_prob=1.0)
    assert torch.equal(m.times, torch.tensor([0.25, 0.5, 0.75, 1.0])) and not m.start_from_zero and m.mirrored


def test_configurable_rates_and_dtype():
    g = torch.Generator().manual_seed(1)
    d = [sample_frame_times(8, 64, zero_rate=0.5, mirror_prob=0.0, generator=g) for _ in range(2000)]
    rate = sum(x.start_from_zero for x in d) / 2000
    assert abs(rate - 0.5) < _binomial_tol(0.5, 2000)
    assert {x.stride for x in d} == set(range(1, 9))
    t64 = sample_frame_times(generator=g, dtype=torch.float64).times
    assert t64.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=0), "num_frames=0"),
        (dict(num_frames=16, precision=8), "precision=8"),
        (dict(zero_rate=1.5), "zero_rate=1.5"),
        (dict(mirror_prob=-0.1), "mirror_prob=-0.1"),
    ],
)
def test_bad_arguments_raise_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_times(**kwargs)


def test_eval_times():
    torch.testing.assert_close(eval_times(5), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(eval_times(4, endpoint=False), torch.tensor([0.0, 0.25, 0.5, 0.75]))
    torch.testing.assert_close(eval_times(3, 0.5, 1.0), torch.tensor([0.5, 0.75, 1.0]))
    assert eval_times(1, 0.5).tolist() == [0.5]
    # the upstream validation video: linspace(0, 1, 64)[:62] spans 0 .. 61/63
    assert eval_times(64)[61].item() == pytest.approx(61 / 63)
    with pytest.raises(ValueError, match="num=0"):
        eval_times(0)


# ---- every outcome of small lattices, with its exact probability ---------------------------------------------------

N_UNIFORM = 10  # the coins' U takes i / 10, i < 10: exact probabilities for rates that are multiples of 0.1


def _all_outcomes(monkeypatch, **kwargs) -> dict:
    """{(lattice indices, start_from_zero, stride, start, mirrored): probability} of ``sample_frame_times(**kwargs)``
    over every combination of its draws: each randint(low, high) takes each of its values with probability
    1 / (high - low), each U takes i / N_UNIFORM with probability 1 / N_UNIFORM (a depth-first walk of the draw
    tree)."""
    path: list[int] = []
    sizes: list[int] = []  # the options of each draw of the current run

    def choose(n):
        assert n >= 1
        if len(sizes) == len(path):
            path.append(0)
        sizes.append(n)
        return path[len(sizes) - 1]

    monkeypatch.setattr(frame_times, "_randint", lambda low, high, generator: low + choose(high - low))
    monkeypatch.setattr(frame_times, "_uniform", lambda generator: choose(N_UNIFORM) / N_UNIFORM)
    outcomes: dict = {}
    while True:
        sizes.clear()
        clip = sample_frame_times(**kwargs, dtype=torch.float64)
        index = clip.times * kwargs["precision"]
        assert (index - index.round()).abs().max() < 1e-9, clip.times  # on the lattice
        key = (tuple(int(i) for i in index.round()), clip.start_from_zero, clip.stride, clip.start, clip.mirrored)
        probability = Fraction(1)
        for n in sizes:
            probability /= n
        outcomes[key] = outcomes.get(key, 0) + probability
        del path[len(sizes):]
        while path and path[-1] + 1 == sizes[len(path) - 1]:
            path.pop()
        if not path:
            return outcomes
        path[-1] += 1


def _reference_outcomes(num_frames, precision, zero_rate, mirror_prob) -> dict:
    """The same distribution enumerated from the algorithm as documented (module docstring, steps 1-5)."""
    zero_rate, mirror_prob = Fraction(zero_rate).limit_denominator(100), Fraction(mirror_prob).limit_denominator(100)
    outcomes: dict = {}
    draws = range(num_frames, precision + 1)  # randint(F, P), both ends included
    for from_zero, p_zero in ((True, zero_rate), (False, 1 - zero_rate)):
        for draw in draws:
            stride = draw // num_frames
            starts = [0] if from_zero else list(range(precision - stride * num_frames + 1))
            for start in starts:
                for mirrored, p_mirror in ((True, mirror_prob), (False, 1 - mirror_prob)):
                    index = [start + stride * f for f in range(num_frames)]
                    if mirrored:
                        index = sorted(precision - i for i in index)
                    key = (tuple(index), from_zero and not mirrored, stride, start, mirrored)
                    p = p_zero * Fraction(1, len(draws)) * Fraction(1, len(starts)) * p_mirror
                    outcomes[key] = outcomes.get(key, 0) + p
    return {k: p for k, p in outcomes.items() if p > 0}


LATTICES = [(1, 1), (1, 4), (2, 2), (2, 5), (3, 7), (4, 4), (4, 9), (5, 12)]


@pytest.mark.parametrize("num_frames, precision", LATTICES)
@pytest.mark.parametrize("zero_rate, mirror_prob", [(0.2, 0.5), (0.0, 0.0), (1.0, 1.0), (0.3, 0.1)])
def test_every_clip_of_small_lattices_with_its_exact_probability(monkeypatch, num_frames, precision, zero_rate,
                                                                 mirror_prob):
    """Catches any change to the ranges of the draws (start in [0, P - span] both ends included, the stride's
    randint(F, P) both ends included), to the mirror (t -> 1 - t, order reversed, flag cleared) or to the coins
    (U < rate): every clip the sampler can return, and its probability, equal an enumeration of the documented
    algorithm."""
    got = _all_outcomes(monkeypatch, num_frames=num_frames, precision=precision, zero_rate=zero_rate,
                        mirror_prob=mirror_prob)
    expected = _reference_outcomes(num_frames, precision, zero_rate, mirror_prob)
    assert set(got) == set(expected)
    assert got == expected
    assert sum(got.values()) == 1


def test_start_and_stride_ranges_reach_both_ends(monkeypatch):
    """Catches a start range one short at either end: with F = 4, P = 16 every stride k = 1..4 occurs, and for each
    every start 0 .. 16 - 4k occurs, and no other."""
    got = _all_outcomes(monkeypatch, num_frames=4, precision=16, zero_rate=0.2, mirror_prob=0.5)
    starts: dict = {}
    for _, _, stride, start, _ in got:
        starts.setdefault(stride, set()).add(start)
    assert starts == {k: set(range(16 - 4 * k + 1)) for k in (1, 2, 3, 4)}
    assert stride_probabilities(4, 16) == {1: 4 / 13, 2: 4 / 13, 3: 4 / 13, 4: 1 / 13}
