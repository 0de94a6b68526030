"""Textual inversion: a learned word embedding for the subject of the input image (Animate124 §3.3).

The semantic-refinement stage conditions ControlNet-Tile on a prompt such as ``"a <token> is dancing"``, where
``<token>`` stands for a new word whose embedding was optimised on the input image (``animate124 invert``, the
diffusers ``textual_inversion`` recipe). This module adds that word to a CLIP tokenizer and text encoder and rewrites
prompts to use it.

File formats read (always without unpickling code: ``torch.load(weights_only=True)`` or safetensors):

- diffusers / Animate124: ``{"<name>": tensor[D]}`` (e.g. ``{"_panda_dance_": [768]}``), ``.bin`` or ``.safetensors``;
- multi-vector: ``{"<name>": tensor[n, D]}``, added as ``name``, ``name_1``, …, ``name_{n-1}``;
- Automatic1111: ``{"string_to_param": {"*": tensor[n, D]}}`` (the token name is then the file stem).
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from animate124.core.safe_files import load_tensors

PLACEHOLDER = "<token>"
"""The placeholder users write in prompts (``"a <token> is dancing"``)."""


def read_learned_embeds(path: str | Path) -> tuple[str, Float[Tensor, "n D"]]:
    """The token name and its ``[n, D]`` embedding rows from a ``learned_embeds.bin`` / ``.safetensors`` file.

    Raises:
        FileNotFoundError: the file does not exist (the message says how to make one).
        ValueError: the file holds no single embedding tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"textual inversion: no embedding file at {str(path)!r}; make one from the input image with "
            f"`animate124 invert` (see `animate124 invert --help`) or fix the path"
        )
    data = load_tensors(path)  # safetensors or a tensors-only pickle; code-running pickles are refused
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # Automatic1111 format
        data = {path.stem: next(iter(data["string_to_param"].values()))}
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)} if isinstance(data, dict) else {}
    if len(tensors) != 1:
        raise ValueError(
            f"textual inversion: {str(path)!r} must hold exactly one embedding tensor keyed by its token, found keys "
            f"{list(data)[:5] if isinstance(data, dict) else type(data).__name__}; re-export it with `animate124 invert`"
        )
    name, emb = next(iter(tensors.items()))
    emb = emb.detach().float()
    return name, emb.reshape(-1, emb.shape[-1])


def load_textual_inversion(
    path: str | Path, tokenizer, text_encoder, token: str | None = None, model_name: str = "text encoder"
) -> str:
    """Add the learned token(s) of ``path`` to ``tokenizer`` and write their rows into ``text_encoder``'s input
    embedding table (resized as needed). Returns the token string to put in prompts (``n`` space-separated tokens for
    a multi-vector embedding). Loading the same file twice is harmless (the rows are rewritten).

    Args:
        token: name to register instead of the file's key.
        model_name: how to name the text encoder in error messages (e.g. its hub id).

    Raises:
        ValueError: the embedding width does not match the text encoder's hidden size, or the token collides with
            an existing ordinary word of the vocabulary.
    """
    name, rows = read_learned_embeds(path)
    name = token or name
    table = text_encoder.get_input_embeddings()
    if rows.shape[-1] != table.weight.shape[-1]:
        raise ValueError(
            f"textual inversion: {str(path)!r} has {rows.shape[-1]}-d embeddings but {model_name} expects "
            f"{table.weight.shape[-1]}-d; invert against the same text encoder (SD 1.5 is 768-d) with `animate124 invert`"
        )
    tokens = [name] + [f"{name}_{i}" for i in range(1, rows.shape[0])]
    vocab = tokenizer.get_vocab()
    added = set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    for tok in tokens:
        if tok in vocab and tok not in added:
            raise ValueError(
                f"textual inversion: token {tok!r} is already an ordinary word of the tokenizer; "
                f"pass token='<something-unique>'"
            )
    tokenizer.add_tokens([t for t in tokens if t not in vocab])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(tokenizer) > table.weight.shape[0]:
        try:  # the new rows are overwritten below, so skip transformers' mean-resizing initialisation
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        except TypeError:  # transformers < 4.46
            text_encoder.resize_token_embeddings(len(tokenizer))
        table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for i, row in zip(ids, rows, strict=True):
            table.weight[i] = row.to(table.weight.dtype)
    return " ".join(tokens)


def replace_placeholder(prompt: str, token: str, placeholder: str = PLACEHOLDER) -> str:
    """``prompt`` with every ``placeholder`` replaced by ``token`` (``"a <token> is dancing"`` →
    ``"a _panda_dance_ is dancing"``).

    Raises:
        ValueError: the prompt does not contain the placeholder (the learned subject would silently be dropped).
    """
    if placeholder not in prompt:
        raise ValueError(
            f"textual inversion: prompt {prompt!r} has no {placeholder!r} placeholder; write it where the subject goes, "
            f"e.g. 'a {placeholder} is dancing'"
        )
    return prompt.replace(placeholder, token)
