"""`animate124 invert`: textual inversion on a tiny SD 1.5 (real classes, real CLIP tokenizer, random weights).

A random tiny U-Net barely listens to its prompt (moving the token row changes a fixed batch's loss by < 0.001), so
the loss test uses a text-sensitive variant of the tiny SD: the text encoder's final LayerNorm gain and the U-Net's
cross-attention output projections are scaled by 30 (a fixed 32-sample loss then moves by ~0.04 with the row).
Even so the per-step loss is dominated by the random timesteps and noise, so the test compares paired runs: the
same seed (hence the same crops, prompts, noise and timesteps) with lr = 0 (control) and lr = 5e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from animate124.tools import invert
from animate124.tools.cli import ToolError, main

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "examples"
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
    from animate124.core.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny"), kinds=["sd"])["sd"]


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    if not PHOTO.exists():
        pytest.skip(f"reference data {PHOTO} is missing (expected ../shared/data beside the project root)")
    image = invert.load_image(PHOTO)
    return torch.nn.functional.interpolate(image[None], size=(40, 40), mode="area")[0]


def _parts(folder: Path, text_gain: float = 1.0) -> dict:
    parts = invert.load_sd_parts(str(folder), "cpu", fp16=False)
    if text_gain != 1.0:
        with torch.no_grad():
            parts["text_encoder"].final_layer_norm.weight.mul_(text_gain)
            for name, module in parts["unet"].named_modules():
                if name.endswith("attn2.to_out.0"):
                    module.weight.mul_(text_gain)
    return parts


def _fixed_batch_loss(parts: dict, image: torch.Tensor, n: int = 32) -> float:
    """Loss on one fixed set of n crops / prompts / noises / timesteps (seeded), for before/after comparisons."""
    generator = torch.Generator().manual_seed(123)
    pixels = torch.stack([invert.augment_image(image, 32, generator) for _ in range(n)])
    prompts = [invert.OBJECT_TEMPLATES[i % len(invert.OBJECT_TEMPLATES)].format("_panda_") for i in range(n)]
    tokenizer = parts["tokenizer"]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return float(invert.inversion_loss(parts, pixels, ids, generator))


def test_loss_goes_down_against_a_frozen_twin(tiny_sd, photo):
    kwargs = dict(steps=40, batch_size=2, resolution=32, seed=0, progress=False)
    control = invert.train_token(_parts(tiny_sd, 30.0), photo, "_panda_", "panda", lr=0.0, **kwargs)
    parts = _parts(tiny_sd, 30.0)
    trained = invert.train_token(parts, photo, "_panda_", "panda", lr=5e-2, **kwargs)
    # same draws in both runs: the difference is the effect of the learned row alone
    diff = np.array(trained.losses) - np.array(control.losses)
    assert diff[0] == 0.0  # step 1 sees the initial row in both runs
    print(f"paired loss difference: first 10 steps {diff[:10].mean():+.4f}, last 10 steps {diff[-10:].mean():+.4f}")
    assert diff[-10:].mean() < 0.0
    assert diff[-10:].mean() < diff[:10].mean()
    # and on a fixed held-out batch: the learned row beats the init word's row
    after = _fixed_batch_loss(parts, photo)
    embeddings = parts["text_encoder"].get_input_embeddings().weight
    tokenizer = parts["tokenizer"]
    token_id, init_id = tokenizer.convert_tokens_to_ids("_panda_"), tokenizer.convert_tokens_to_ids("panda</w>")
    with torch.no_grad():
        embeddings[token_id] = embeddings[init_id]
    before = _fixed_batch_loss(parts, photo)
    print(f"fixed 32-sample loss: init row {before:.4f} -> learned row {after:.4f}")
    assert after < before - 0.01


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
