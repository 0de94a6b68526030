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
