"""``a124-video-prompt-processor``: the video model's CLIP text encoder.

A host ``PromptProcessor`` subclass, so guidances read it through ``prompt_utils`` exactly like the host's. It
defaults to ``spawn: false``: a spawned child process cannot import a plugin module (threestudio's loader imports
``custom/`` extensions only in the main process).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import threestudio
import torch
from threestudio.models.prompt_processors.base import hash_prompt
from threestudio.models.prompt_processors.stable_diffusion_prompt_processor import StableDiffusionPromptProcessor

from animate124.core.guidance import text_encoding
from animate124.core.guidance.video_sds import MODELSCOPE_ID
from animate124.core.io.atomic_io import save_with


@threestudio.register("a124-video-prompt-processor")
class VideoPromptProcessor(StableDiffusionPromptProcessor):
    """Text embeddings of the text-to-video model's CLIP encoder (same folder layout as SD: tokenizer/,
    text_encoder/). View suffixes are built as the host does; ``a124-video-sds-guidance`` uses the one of the clip's
    first camera (``view_dependent_prompting``, on by default as upstream)."""

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
