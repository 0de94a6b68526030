"""``a124-textual-inversion-prompt-processor``: SD 1.5 with a learned token (``animate124 invert``).

A host ``PromptProcessor`` subclass, so guidances read it through ``prompt_utils`` exactly like the host's. It
defaults to ``spawn: false``: a spawned child process cannot import a plugin module (threestudio's loader imports
``custom/`` extensions only in the main process).
"""
from __future__ import annotations

from dataclasses import dataclass

import threestudio
import torch
from threestudio.models.prompt_processors.stable_diffusion_prompt_processor import StableDiffusionPromptProcessor

from animate124.core.guidance import text_encoding
from animate124.core.guidance.textual_inversion import PLACEHOLDER, load_textual_inversion, replace_placeholder


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
