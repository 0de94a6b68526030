"""CLIP text conditioning, the one home for loading a text encoder and turning prompts into embeddings.

SD 1.5, ModelScope and ZeroScope all condition on the last hidden state of a CLIP text encoder for prompts padded /
truncated to the tokenizer's ``model_max_length`` (77 tokens). Used by the video and ControlNet SDS cores, the prompt
processors and ``animate124 invert``:

- ``load_text_encoder(path)``: ``(tokenizer, text_encoder)`` from a hub id or a local folder in the diffusers layout;
- ``token_ids(tokenizer, prompts)`` / ``encode(tokenizer, text_encoder, prompts)``: ids ``[B, 77]`` / embeddings
  ``[B, 77, D]`` (``encode`` keeps the caller's grad mode, so textual inversion can train through it);
- ``PromptEncoder``: a frozen encoder with a per-prompt cache (an embedding never changes for a frozen encoder).
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor


def load_tokenizer(name_or_path: str | Path, subfolder: str | None = "tokenizer", *,
                   local_files_only: bool | None = None):
    """The ``CLIPTokenizer`` alone (a second, without the text encoder): enough to check words and tokens before any
    model loads."""
    from transformers import CLIPTokenizer

    from animate124.core.guidance.published_models import resolve_repo_id

    name_or_path = resolve_repo_id(str(name_or_path))  # a renamed repository cached under its other name
    folder = Path(name_or_path) / (subfolder or "")
    if Path(name_or_path).is_dir() and not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        # recent transformers build an empty tokenizer from a folder without its files instead of raising
        raise OSError(f"{folder} holds no tokenizer (vocab.json or tokenizer.json)")
    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    return CLIPTokenizer.from_pretrained(str(name_or_path), **_sub(subfolder), **kwargs)


def load_text_encoder(
    name_or_path: str | Path,
    subfolder: str | None = "text_encoder",
    *,
    tokenizer_subfolder: str | None = "tokenizer",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    frozen: bool = True,
    local_files_only: bool | None = None,
):
    """``(tokenizer, text_encoder)``: ``CLIPTokenizer`` and ``CLIPTextModel`` from the ``tokenizer`` /
    ``text_encoder`` sub-folders of a hub id or local folder (``None``: the folder itself).

    ``frozen``: eval mode and no gradient (guidance, prompt processors); ``False`` leaves the encoder as loaded, for
    training a textual-inversion token.

    Raises:
        OSError: one line naming the path and the folder layout it needs.
    """
    from transformers import CLIPTextModel

    from animate124.core.guidance.published_models import resolve_repo_id
    from animate124.core.io.safe_files import weights_only_pickles

    path = resolve_repo_id(str(name_or_path))
    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    with weights_only_pickles() as refused:
        try:
            tokenizer = load_tokenizer(path, tokenizer_subfolder, local_files_only=local_files_only)
            text_encoder = CLIPTextModel.from_pretrained(path, **_sub(subfolder), torch_dtype=dtype, **kwargs)
        except Exception as err:  # noqa: BLE001 - transformers 4.28 reports a missing folder as an invalid hub id
            if refused:
                raise OSError(f"could not load the text encoder of {path!r}: {refused[0]}") from None
            if not isinstance(err, (OSError, ValueError)):
                raise
            raise OSError(
                f"could not load the text encoder / tokenizer of {path!r}: download it once or point the id at a "
                f"local folder with {subfolder or '.'}/ and {tokenizer_subfolder or '.'}/ sub-folders; "
                f"error: {str(err).splitlines()[0]}"
            ) from err
    text_encoder = text_encoder.to(device)
    if frozen:
        text_encoder.eval().requires_grad_(False)
    return tokenizer, text_encoder


def token_ids(tokenizer, prompts: str | list[str]) -> Int[Tensor, "B L"]:
    """Token ids ``[B, model_max_length]``, padded and truncated to the tokenizer's length (77 for CLIP)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode(tokenizer, text_encoder, prompts: str | list[str]) -> Float[Tensor, "B L D"]:
    """CLIP last hidden state ``[B, 77, D]`` (fp32) of the prompts, on the encoder's device. Gradients flow when the
    caller's grad mode allows (``torch.no_grad()`` around it for frozen use)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(token_ids(tokenizer, prompts).to(device))[0].float()


class PromptEncoder:
    """A frozen tokenizer + text encoder with a per-prompt embedding cache (kept for the life of the object).

    Load a textual inversion into ``tokenizer`` / ``text_encoder`` *before* encoding prompts that use its token: the
    cache is keyed by prompt string only.
    """

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self._cache: dict[str, Tensor] = {}  # prompt -> [1, 77, D]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs) -> "PromptEncoder":
        """``PromptEncoder(*load_text_encoder(name_or_path, **kwargs))``."""
        return cls(*load_text_encoder(name_or_path, **kwargs))

    @torch.no_grad()
    def __call__(self, prompts: str | list[str]) -> Float[Tensor, "B L D"]:
        """Embeddings ``[len(prompts), 77, D]``; prompts not seen before are encoded in one batched call."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            embeddings = encode(self.tokenizer, self.text_encoder, missing)
            self._cache.update({p: e[None] for p, e in zip(missing, embeddings, strict=True)})
        return torch.cat([self._cache[p] for p in prompts])


def encode_cached(prompt_encoder: PromptEncoder | None, prompts: str | list[str], owner: str) -> Tensor:
    """``prompt_encoder(prompts)``; a one-line error naming the fix when ``owner`` was loaded without a text encoder."""
    if prompt_encoder is None:
        raise ValueError(
            f"encode_prompt: this {owner} has no text encoder; load it with load_text_encoder=True or pass the "
            "embeddings (cond_embeddings / uncond_embeddings) to the call"
        )
    return prompt_encoder(prompts)


def _sub(subfolder: str | None) -> dict:
    return {"subfolder": subfolder} if subfolder else {}
