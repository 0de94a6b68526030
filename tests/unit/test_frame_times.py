"""Frame-time sampler (upstream's clip-time algorithm): statistics over 10k draws and exact small cases."""

import math

import pytest
import torch

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
