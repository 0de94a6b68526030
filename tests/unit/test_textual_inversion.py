"""Textual inversion: learn a token on a tiny SD 1.5, load it into the tokenizer / text encoder, use it in prompts.

A random tiny U-Net barely listens to its prompt: the per-step loss of the real loop is dominated by the random
timesteps and noise (a spread of ~0.1 against a possible gain of ~0.01), so "the loss goes down" is tested on a
replayed batch (train_token's overfit_one_batch: step 0's draws every step), where only the learned row changes.
"""

import numpy as np
import pytest
import torch
from checks import one_thread  # noqa: F401  (module fixture: one torch thread)

from animate124.core.guidance import textual_inversion as ti
from animate124.core.guidance.textual_inversion import (
    PLACEHOLDER,
    load_textual_inversion,
    read_learned_embeds,
    replace_placeholder,
)
from animate124.tools import invert


@pytest.fixture()
def sd_text(tiny_models):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_models["sd"], subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(tiny_models["sd"], subfolder="text_encoder").eval()
    return tok, enc


def _save(path, data):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(data, str(path))
    else:
        torch.save(data, str(path))
    return path


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_learned_token_loads_and_replaces(sd_text, tmp_path, suffix):
    tok, enc = sd_text
    row = torch.randn(32, generator=torch.Generator().manual_seed(0))
    path = _save(tmp_path / f"learned_embeds{suffix}", {"_panda_dance_": row})
    n_vocab = len(tok)
    token = load_textual_inversion(path, tok, enc)
    assert token == "_panda_dance_"
    assert len(tok) == n_vocab + 1 and enc.get_input_embeddings().weight.shape[0] == n_vocab + 1
    prompt = replace_placeholder("a <token> is dancing", token)
    assert prompt == "a _panda_dance_ is dancing"
    ids = tok(prompt).input_ids
    assert ids == [49406, 320, 49408, 533, 6226, 49407]  # the new word is one token with the next free id
    torch.testing.assert_close(enc.get_input_embeddings().weight[49408], row, rtol=0, atol=0)
    # the text encoder now sees the learned row at that position
    with torch.no_grad():
        x = enc.get_input_embeddings()(torch.tensor([ids]))
    torch.testing.assert_close(x[0, 2], row, rtol=0, atol=0)
    # loading again is harmless: same id, row rewritten
    assert load_textual_inversion(path, tok, enc) == token and len(tok) == n_vocab + 1


def test_multi_vector_and_renamed_token(sd_text, tmp_path):
    tok, enc = sd_text
    rows = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    path = _save(tmp_path / "multi.bin", {"<cat-toy>": rows})
    token = load_textual_inversion(path, tok, enc, token="_toy_")
    assert token == "_toy_ _toy__1 _toy__2"
    ids = tok.convert_tokens_to_ids(token.split())
    torch.testing.assert_close(enc.get_input_embeddings().weight[ids], rows, rtol=0, atol=0)
    name, read = read_learned_embeds(path)
    assert name == "<cat-toy>" and read.shape == (3, 32)


def test_real_example_embedding_has_the_wrong_size_for_the_tiny_encoder(sd_text, shared_data):
    """The shipped examples were inverted against SD 1.5 (768-d); the tiny encoder is 32-d."""
    tok, enc = sd_text
    path = shared_data / "examples" / "panda-dance" / "learned_embeds.bin"
    if not path.is_file():
        pytest.skip(f"example embedding missing: {path}")
    name, rows = read_learned_embeds(path)
    assert name == "_panda_dance_" and rows.shape == (1, 768)
    with pytest.raises(ValueError, match="has 768-d embeddings but tiny-sd expects 32-d"):
        load_textual_inversion(path, tok, enc, model_name="tiny-sd")
    assert len(tok) == 49408  # nothing was added


def test_missing_file_says_how_to_make_one(sd_text, tmp_path):
    tok, enc = sd_text
    with pytest.raises(FileNotFoundError, match=r"no embedding file at .*nope\.bin.*animate124 invert"):
        load_textual_inversion(tmp_path / "nope.bin", tok, enc)


def test_file_without_a_single_tensor_is_rejected(tmp_path):
    path = _save(tmp_path / "two.bin", {"a": torch.zeros(32), "b": torch.zeros(32)})
    with pytest.raises(ValueError, match="exactly one embedding tensor"):
        read_learned_embeds(path)


def test_automatic1111_format(tmp_path):
    path = _save(tmp_path / "mytoken.bin", {"string_to_param": {"*": torch.ones(2, 32)}, "name": "x"})
    name, rows = read_learned_embeds(path)
    assert name == "mytoken" and rows.shape == (2, 32)


def test_prompt_without_placeholder_is_rejected():
    with pytest.raises(ValueError, match="has no '<token>' placeholder"):
        replace_placeholder("a panda is dancing", "_panda_dance_")
    assert replace_placeholder("<token> and <token>", "x") == "x and x"
    assert PLACEHOLDER == "<token>"


def test_token_colliding_with_an_ordinary_word_is_rejected(sd_text, tmp_path):
    import copy

    tok, enc = copy.deepcopy(sd_text)  # this test adds a token
    path = _save(tmp_path / "a.bin", {"a": torch.zeros(32)})  # "a" is a byte-level vocabulary entry
    with pytest.raises(ValueError, match="holds token 'a', which is already the word 'a' of the tokenizer"):
        load_textual_inversion(path, tok, enc)
    # whole words are stored with CLIP's word-end mark: 'panda' is the entry 'panda</w>', 'Panda' is read as it
    for key in ("panda", "Panda"):
        path = _save(tmp_path / f"{key}.bin", {key: torch.zeros(32)})
        with pytest.raises(ValueError, match=f"holds token '{key}', which is already the word 'panda</w>' of the "
                                             rf"tokenizer \(every '{key}' in a prompt would become the learned "
                                             r"vector\)"):
            load_textual_inversion(path, tok, enc)
    assert "panda" not in tok.get_added_vocab() and "Panda" not in tok.get_added_vocab()  # refused before adding
    path = _save(tmp_path / "new.bin", {"_panda_": torch.zeros(32)})
    assert load_textual_inversion(path, tok, enc) == "_panda_"
    assert load_textual_inversion(path, tok, enc) == "_panda_"  # the same file again: harmless


# --- one path: ours against diffusers' TextualInversionLoaderMixin.load_textual_inversion, one test per format -------


def _diffusers_load(tiny_models, state_dict, token=None):
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextModel, CLIPTokenizer

    class Holder(TextualInversionLoaderMixin):  # the pipeline-shaped object diffusers' loader needs
        hf_device_map, components = None, {}

    holder = Holder()
    holder.tokenizer = CLIPTokenizer.from_pretrained(tiny_models["sd"], subfolder="tokenizer")
    holder.text_encoder = CLIPTextModel.from_pretrained(tiny_models["sd"], subfolder="text_encoder").eval()
    holder.load_textual_inversion(state_dict, token=token)
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):  # diffusers refuses a second load
        holder.load_textual_inversion(state_dict, token=token)
    return holder.tokenizer, holder.text_encoder


def _same_as_diffusers(tiny_models, sd_text, path, state_dict, expected_tokens, token=None):
    tok, enc = sd_text
    ours = load_textual_inversion(path, tok, enc, token=token).split()
    d_tok, d_enc = _diffusers_load(tiny_models, state_dict, token)
    assert ours == expected_tokens
    ids = tok.convert_tokens_to_ids(ours)
    assert ids == d_tok.convert_tokens_to_ids(ours) == list(range(49408, 49408 + len(ours)))
    torch.testing.assert_close(enc.get_input_embeddings().weight[ids], d_enc.get_input_embeddings().weight[ids],
                               rtol=0, atol=0)
    assert enc.get_input_embeddings().weight.shape[0] == 49408 + len(ours)
    prompt = replace_placeholder("a <token> is dancing", " ".join(ours))
    assert tok(prompt).input_ids == d_tok(prompt).input_ids


def test_diffusers_format_same_as_diffusers_loader(tiny_models, sd_text, tmp_path):
    state = {"_panda_dance_": torch.randn(32, generator=torch.Generator().manual_seed(2))}
    path = _save(tmp_path / "learned_embeds.safetensors", state)
    _same_as_diffusers(tiny_models, sd_text, path, state, ["_panda_dance_"])


def test_multi_vector_format_same_as_diffusers_loader(tiny_models, sd_text, tmp_path):
    state = {"<cat-toy>": torch.randn(3, 32, generator=torch.Generator().manual_seed(3))}
    path = _save(tmp_path / "multi.bin", state)
    _same_as_diffusers(tiny_models, sd_text, path, state, ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"])


def test_automatic1111_format_same_as_diffusers_loader(tiny_models, sd_text, tmp_path):
    # A1111 prompts use the file name; diffusers uses the "name" field: equal here, as A1111 writes them
    state = {"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(4))},
             "string_to_token": {"*": 265}, "name": "mytoken", "step": 3000}
    path = _save(tmp_path / "mytoken.bin", state)
    _same_as_diffusers(tiny_models, sd_text, path, state, ["mytoken", "mytoken_1"])


# --- learning the token (train_token and its parts) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tiny_models):
    return tiny_models["sd"]


@pytest.fixture(scope="module")
def photo(shared_data) -> torch.Tensor:
    image = invert.load_image(shared_data / "examples" / "panda-dance" / "image.jpg")
    return torch.nn.functional.interpolate(image[None], size=(40, 40), mode="area")[0]


def _parts(folder) -> dict:
    return invert.load_sd_parts(str(folder), "cpu", fp16=False)


def test_loss_goes_down_on_a_replayed_batch(tiny_sd, photo):
    # fixed seed, small batch, every step replays step 0's crops/prompts/noise/timesteps: only the row changes
    parts = _parts(tiny_sd)
    result = ti.train_token(parts, photo, "_panda_", "panda", steps=30, batch_size=2, lr=1e-2, resolution=32,
                                seed=0, progress=False, overfit_one_batch=True)
    losses = np.array(result.losses)
    first, last = losses[:5].mean(), losses[-5:].mean()
    print(f"replayed-batch loss: first 5 steps {first:.4f}, last 5 steps {last:.4f} ({(last - first) / first:+.2%})")
    assert last < first * (1 - 1e-3)
    assert losses[-1] < losses[0]
    # fresh draws every step (the real loop): same seed -> same losses, and the draws differ from step to step
    twice = [ti.train_token(_parts(tiny_sd), photo, "_panda_", "panda", steps=3, batch_size=1, lr=1e-2,
                                resolution=32, seed=7, progress=False).losses for _ in range(2)]
    assert twice[0] == twice[1] and len(set(twice[0])) == 3
    with pytest.raises(ValueError, match="needs a seed"):
        ti.train_token(_parts(tiny_sd), photo, "_q_", "panda", steps=1, seed=None, overfit_one_batch=True)


def test_only_the_new_row_changes(tiny_sd, photo):
    parts = _parts(tiny_sd)
    old_rows = parts["text_encoder"].get_input_embeddings().weight.detach().clone()
    text_rest = {k: v.clone() for k, v in parts["text_encoder"].state_dict().items() if "token_embedding" not in k}
    unet = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    vae = {k: v.clone() for k, v in parts["vae"].state_dict().items()}
    result = ti.train_token(parts, photo, "_panda_", "panda", steps=3, batch_size=1, lr=1e-2, resolution=32,
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


def test_multi_token_init_word_is_refused(tiny_sd, photo):
    parts = _parts(tiny_sd)
    with pytest.raises(ValueError, match=r"init word '_panda_' is \d+ tokens .* use a plain single word"):
        ti.add_placeholder_token(parts["tokenizer"], parts["text_encoder"], "_x_", "_panda_")
    with pytest.raises(ValueError, match="token 'panda' is already the word 'panda</w>' of the vocabulary"):
        ti.add_placeholder_token(parts["tokenizer"], parts["text_encoder"], "panda", "panda")


def test_augment_range_shape_and_determinism():
    image = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(0))
    a = ti.augment_image(image, 32, torch.Generator().manual_seed(1))
    b = ti.augment_image(image, 32, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0
    # [0, 1] input maps to [-1, 1] (the upstream augmented path left it in [0, 1]); only brightness (x U(0.96, 1.04))
    # changes a constant image, so grey 0.5 -> 0 +- 0.04 and black -> -1 (the rotation's white fill is cropped away)
    for seed in range(8):
        grey = ti.augment_image(torch.full((3, 40, 40), 0.5), 32, torch.Generator().manual_seed(seed))
        assert grey.abs().max() <= 0.04 + 1e-5
        black = ti.augment_image(torch.zeros(3, 40, 40), 32, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(black, torch.full_like(black, -1.0), atol=1e-5, rtol=0)
