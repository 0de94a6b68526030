"""Where a diverging run went wrong and which checkpoint still holds sound parameters (hand-made loss histories)."""
from __future__ import annotations

from animate124.core.training.divergence import checkpoint_before, checkpoint_step, divergence_onset


def _history(losses, stage=0, start=0):
    return [(start + i, stage, loss) for i, loss in enumerate(losses)]


def test_a_gradual_divergence_starts_where_the_loss_left_its_level():
    # 1.0 at steps 0..29, then 50, 400, 3000 at 30..32, NaN at 33: each of 30..32 is > 10 x the median (1.0) of the
    # 20 steps before it, step 29 is not
    history = _history([1.0] * 30 + [50.0, 400.0, 3000.0])
    assert divergence_onset(history, first_bad=33, stage=0) == 30


def test_straight_from_normal_to_non_finite_the_onset_is_the_first_bad_step():
    history = _history([1.0, 0.9, 1.1] * 10)  # steps 0..29, all normal
    assert divergence_onset(history, first_bad=30, stage=0) == 30
    assert divergence_onset(history[:5], first_bad=5, stage=0) == 5  # too few steps for a baseline


def test_noise_and_a_new_stage_are_not_a_divergence():
    # SDS-like noise within 10 x the median never counts; the refine stage's larger losses (stage 1) start at
    # step 30 and are compared only with each other, so a NaN at step 60 began at 60
    noisy = [1.0, 4.0, 0.5, 8.0, 2.0] * 6
    history = _history(noisy) + _history([40.0] * 30, stage=1, start=30)
    assert divergence_onset(history, first_bad=60, stage=1) == 60
    # a gap (step 29 skipped for an fp16 overflow) ends the look-back: only contiguous steps form the divergence,
    # so the abnormal 60.0 at step 28 is not part of it
    gapped = _history([1.0] * 28) + [(28, 0, 60.0), (30, 0, 70.0), (31, 0, 80.0)]
    assert divergence_onset(gapped, first_bad=32, stage=0) == 30


def test_the_checkpoint_to_resume_from():
    paths = ["c/epoch=0-step=10.ckpt", "c/epoch=0-step=20.ckpt", "c/epoch=0-step=30.ckpt", "c/last.ckpt"]
    assert [checkpoint_step(p) for p in paths] == [10, 20, 30, None]
    # onset 30: step=30 holds the parameters step 30 ran with (already abnormal); step=20 is the last sound one
    assert checkpoint_before(paths, onset=30) == (__import__("pathlib").Path("c/epoch=0-step=20.ckpt"), 20)
    assert checkpoint_before(paths, onset=31)[1] == 30  # step 30 ran normally with the step=30 parameters
    assert checkpoint_before(paths, onset=10) is None and checkpoint_before(["c/last.ckpt"], onset=99) is None
