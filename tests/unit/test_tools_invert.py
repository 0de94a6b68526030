"""`animate124 invert`: textual inversion on a tiny SD 1.5 (real classes, real CLIP tokenizer, random weights).

A random tiny U-Net barely listens to its prompt: the per-step loss of the real loop is dominated by the random
timesteps and noise (a spread of ~0.1 against a possible gain of ~0.01), so "the loss goes down" is tested on a
replayed batch (train_token's overfit_one_batch: step 0's draws every step), where only the learned row changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
import torch

from animate124.tools import invert
from animate124.tools.cli import ToolError, main

EXAMPLES = SHARED_DATA / "examples"  # conftest: ../shared/data or $A124_SHARED_DATA
PHOTO = EXAMPLES / "panda-dance" / "image.jpg"

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two threads on a busy 2-core machine spin-wait: the tiny convolutions get ~40x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from animate124.testing.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny"), kinds=["sd"])["sd"]


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    if not PHOTO.exists():
        pytest.skip(f"reference data {PHOTO} is missing (expected ../shared/data beside the project root)")
    image = invert.load_image(PHOTO)
    return torch.nn.functional.interpolate(image[None], size=(40, 40), mode="area")[0]


def _parts(folder: Path) -> dict:
    return invert.load_sd_parts(str(folder), "cpu", fp16=False)


def test_loss_goes_down_on_a_replayed_batch(tiny_sd, photo):
    # fixed seed, small batch, every step replays step 0's crops/prompts/noise/timesteps: only the row changes
    parts = _parts(tiny_sd)
    result = invert.train_token(parts, photo, "_panda_", "panda", steps=30, batch_size=2, lr=1e-2, resolution=32,
                                seed=0, progress=False, overfit_one_batch=True)
    losses = np.array(result.losses)
    first, last = losses[:5].mean(), losses[-5:].mean()
    print(f"replayed-batch loss: first 5 steps {first:.4f}, last 5 steps {last:.4f} ({(last - first) / first:+.2%})")
    assert last < first * (1 - 1e-3)
    assert losses[-1] < losses[0]
    # fresh draws every step (the real loop): same seed -> same losses, and the draws differ from step to step
    twice = [invert.train_token(_parts(tiny_sd), photo, "_panda_", "panda", steps=3, batch_size=1, lr=1e-2,
                                resolution=32, seed=7, progress=False).losses for _ in range(2)]
    assert twice[0] == twice[1] and len(set(twice[0])) == 3
    with pytest.raises(ValueError, match="needs a seed"):
        invert.train_token(_parts(tiny_sd), photo, "_q_", "panda", steps=1, seed=None, overfit_one_batch=True)


def test_only_the_new_row_changes(tiny_sd, photo):
    parts = _parts(tiny_sd)
    old_rows = parts["text_encoder"].get_input_embeddings().weight.detach().clone()
    text_rest = {k: v.clone() for k, v in parts["text_encoder"].state_dict().items() if "token_embedding" not in k}
    unet = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    vae = {k: v.clone() for k, v in parts["vae"].state_dict().items()}
    result = invert.train_token(parts, photo, "_panda_", "panda", steps=3, batch_size=1, lr=1e-2, resolution=32,
                                seed=0, progress=False)
    rows = parts["text_encoder"].get_input_embeddings().weight.detach()
    token_id = parts["tokenizer"].convert_tokens_to_ids("_panda_")
    assert rows.shape[0] == old_rows.shape[0] + 1 and token_id == old_rows.shape[0]
    assert torch.equal(rows[:token_id], old_rows)  # every old row bit-identical (despite AdamW's weight decay)
    init_row = old_rows[parts["tokenizer"].convert_tokens_to_ids("panda</w>")]
    assert not torch.equal(rows[token_id], init_row)
    torch.testing.assert_close(result.embedding, rows[token_id])
    for before, module in ((text_rest, parts["text_encoder"]), (unet, parts["unet"]), (vae, parts["vae"])):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_writes_loadable_embeddings(tiny_sd, tmp_path, capsys):
    if not PHOTO.exists():
        pytest.skip(f"reference data {PHOTO} is missing")
    args = ["invert", str(PHOTO), "--token", "_panda_", "--init", "panda", "--out", str(tmp_path), "--model",
            str(tiny_sd), "--steps", "2", "--batch-size", "1", "--resolution", "32", "--device", "cpu"]
    assert main(args) == 0
    from safetensors.torch import load_file

    binary = torch.load(tmp_path / "learned_embeds.bin", weights_only=True)
    safe = load_file(tmp_path / "learned_embeds.safetensors")
    assert list(binary) == ["_panda_"] and list(safe) == ["_panda_"]
    assert binary["_panda_"].dtype == torch.float32 and binary["_panda_"].shape == (32,)  # tiny text width
    torch.testing.assert_close(binary["_panda_"], safe["_panda_"], rtol=0, atol=0)
    # the same files again without --overwrite: refused, untouched
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_multi_token_init_word_is_refused(tiny_sd, photo):
    parts = _parts(tiny_sd)
    with pytest.raises(ToolError, match=r"--init '_panda_' is \d+ tokens .* use a plain single word"):
        invert.add_placeholder_token(parts["tokenizer"], parts["text_encoder"], "_x_", "_panda_")
    with pytest.raises(ToolError, match="already exists in the vocabulary"):
        invert.add_placeholder_token(parts["tokenizer"], parts["text_encoder"], "panda", "panda")


def test_cli_multi_token_init_is_one_line(tiny_sd, tmp_path, capsys):
    if not PHOTO.exists():
        pytest.skip(f"reference data {PHOTO} is missing")
    status = main(["invert", str(PHOTO), "--token", "_panda_", "--init", "giant panda", "--out", str(tmp_path),
                   "--model", str(tiny_sd), "--steps", "1", "--device", "cpu"])
    assert status == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--init 'giant panda' is 2 tokens" in errors[0]
    assert not (tmp_path / "learned_embeds.bin").exists()


def test_augment_range_shape_and_determinism():
    image = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(0))
    a = invert.augment_image(image, 32, torch.Generator().manual_seed(1))
    b = invert.augment_image(image, 32, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0
    # [0, 1] input maps to [-1, 1] (the upstream augmented path left it in [0, 1]); only brightness (x U(0.96, 1.04))
    # changes a constant image, so grey 0.5 -> 0 +- 0.04 and black -> -1 (the rotation's white fill is cropped away)
    for seed in range(8):
        grey = invert.augment_image(torch.full((3, 40, 40), 0.5), 32, torch.Generator().manual_seed(seed))
        assert grey.abs().max() <= 0.04 + 1e-5
        black = invert.augment_image(torch.zeros(3, 40, 40), 32, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(black, torch.full_like(black, -1.0), atol=1e-5, rtol=0)
