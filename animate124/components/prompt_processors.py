"""Prompt processors: the video model's text encoder, and SD 1.5 with a textual-inversion token.

Both are host ``PromptProcessor`` subclasses, so guidances read them through ``prompt_utils`` exactly like the
host's. They default to ``spawn: false``: a spawned child cannot import a plugin module (threestudio-contract §2.6).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import threestudio
import torch
from threestudio.models.prompt_processors.base import hash_prompt
from threestudio.models.prompt_processors.stable_diffusion_prompt_processor import StableDiffusionPromptProcessor

from animate124.core.guidance import text_encoding
from animate124.core.guidance.textual_inversion import PLACEHOLDER, load_textual_inversion, replace_placeholder
from animate124.core.guidance.video_sds import MODELSCOPE_ID
from animate124.core.io.atomic_io import save_with


@threestudio.register("a124-video-prompt-processor")
class VideoPromptProcessor(StableDiffusionPromptProcessor):
    """Text embeddings of the text-to-video model's CLIP encoder (same folder layout as SD: tokenizer/,
    text_encoder/). View suffixes are built as the host does; ``a124-video-sds-guidance`` uses them only with
    ``view_dependent_prompting: true`` (off by default: a moving-camera clip has no single view)."""

    @dataclass
    class Config(StableDiffusionPromptProcessor.Config):
        pretrained_model_name_or_path: str = MODELSCOPE_ID
        spawn: bool = False

    cfg: Config

    @staticmethod
    def spawn_func(pretrained_model_name_or_path, prompts, cache_dir):
        """The host's per-prompt cache files, computed with ``core/guidance/text_encoding.py`` (prompts longer than 77 tokens
        are truncated, as the SDS cores do, instead of failing). Each file appears whole or not at all: two runs
        started together in one checkout share the cache, and the host loads any file that exists (a half-written
        one stopped a run on an H200 with ``EOFError``)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer, text_encoder = text_encoding.load_text_encoder(pretrained_model_name_or_path, device=device)
        with torch.no_grad():
            embeddings = text_encoding.encode(tokenizer, text_encoder, prompts)
        for prompt, embedding in zip(prompts, embeddings):
            path = os.path.join(cache_dir, f"{hash_prompt(pretrained_model_name_or_path, prompt)}.pt")
            save_with(path, lambda tmp, embedding=embedding: torch.save(embedding, tmp))


@threestudio.register("a124-textual-inversion-prompt-processor")
class TextualInversionPromptProcessor(StableDiffusionPromptProcessor):
    """SD 1.5 embeddings of a prompt whose ``<token>`` is the learned subject word (``animate124 invert``).

    Embeddings are computed in-process and not cached on disk: the cache key of the host (model + prompt) cannot tell
    two different embeddings of the same token name apart.
    """

    @dataclass
    class Config(StableDiffusionPromptProcessor.Config):
        learned_embeds_path: str = ""
        """learned_embeds.bin / .safetensors ({token: tensor[768]})."""
        placeholder: str = PLACEHOLDER
        spawn: bool = False
        use_cache: bool = False

    cfg: Config

    def configure(self) -> None:
        self._tokenizer, self._text_encoder = text_encoding.load_text_encoder(self.cfg.pretrained_model_name_or_path)
        token = load_textual_inversion(
            self.cfg.learned_embeds_path, self._tokenizer, self._text_encoder,
            model_name=self.cfg.pretrained_model_name_or_path,
        )
        self.cfg.prompt = replace_placeholder(self.cfg.prompt, token, self.cfg.placeholder)
        self.learned_token = token
        super().configure()

    def prepare_text_embeddings(self) -> None:
        prompts = [self.prompt, self.negative_prompt] + self.prompts_vd + self.negative_prompts_vd
        with torch.no_grad():
            embeddings = text_encoding.encode(self._tokenizer, self._text_encoder, prompts).to(self.device)
        self._embedding_of = dict(zip(prompts, embeddings))
        del self._text_encoder

    def load_from_cache(self, prompt):
        return self._embedding_of[prompt]
