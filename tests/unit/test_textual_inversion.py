"""Textual inversion: load a learned token into the tiny SD tokenizer / text encoder and use it in prompts."""

import pytest
import torch

from animate124.core.textual_inversion import (
    PLACEHOLDER,
    load_textual_inversion,
    read_learned_embeds,
    replace_placeholder,
)


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
    tok, enc = sd_text
    path = _save(tmp_path / "a.bin", {"a": torch.zeros(32)})  # "a" is a byte-level vocabulary entry
    with pytest.raises(ValueError, match="already an ordinary word"):
        load_textual_inversion(path, tok, enc)


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
