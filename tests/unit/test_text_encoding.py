"""core/guidance/text_encoding.py on the tiny SD folder's CLIP tokenizer and text encoder, loaded through from_pretrained."""

import pytest
import torch

from animate124.core.guidance import text_encoding


@pytest.fixture(scope="module")
def clip(tiny_models):
    return text_encoding.load_text_encoder(tiny_models["sd"])


def test_load_frozen_and_trainable(tiny_models, clip):
    tokenizer, encoder = clip
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    _, trainable = text_encoding.load_text_encoder(tiny_models["sd"], frozen=False)
    assert all(p.requires_grad for p in trainable.parameters())
    # the tokenizer pads / truncates to its model_max_length: 77 ids, BOS first, EOS after the text
    ids = text_encoding.token_ids(tokenizer, ["a panda", "word " * 100])
    assert ids.shape == (2, 77) and ids[0, 0] == tokenizer.bos_token_id
    assert ids[0, 3] == tokenizer.eos_token_id and ids[1, -1] == tokenizer.eos_token_id


def test_encode_is_the_last_hidden_state_and_keeps_the_grad_mode(tiny_models, clip):
    tokenizer, encoder = clip
    ids = tokenizer(["a panda", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = encoder(ids).last_hidden_state
    got = text_encoding.encode(tokenizer, encoder, ["a panda", ""])
    assert got.shape == (2, 77, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # textual inversion trains through encode: gradients reach the token table
    _, trainable = text_encoding.load_text_encoder(tiny_models["sd"], frozen=False)
    text_encoding.encode(tokenizer, trainable, "a panda").sum().backward()
    table = trainable.get_input_embeddings().weight.grad
    assert table is not None and table[ids[0, 1]].abs().sum() > 0


def test_prompt_encoder_caches_per_prompt(clip):
    tokenizer, encoder = clip
    prompt_encoder = text_encoding.PromptEncoder(tokenizer, encoder)
    calls = []
    hook = encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = prompt_encoder(["a cat", "a dog", "a cat"])
        again = prompt_encoder("a dog")
    finally:
        hook.remove()
    assert len(calls) == 1  # one batched encoder call for the two new prompts, none for the cached one
    assert first.shape == (3, 77, 32)
    torch.testing.assert_close(again[0], first[1], rtol=0, atol=0)
    torch.testing.assert_close(first[0], first[2], rtol=0, atol=0)
    torch.testing.assert_close(first[:2], text_encoding.encode(tokenizer, encoder, ["a cat", "a dog"]), rtol=0, atol=0)
    assert not torch.equal(first[0], first[1])


def test_missing_folder_and_missing_encoder_errors_name_the_fix(tmp_path):
    with pytest.raises(OSError, match="text_encoder/ and tokenizer/"):
        text_encoding.load_text_encoder(tmp_path / "nowhere", local_files_only=True)
    with pytest.raises(ValueError, match="load_text_encoder=True"):
        text_encoding.encode_cached(None, "a panda", "VideoSDS")
