"""The video guidance's text, as upstream's: the motion prompt with threestudio's view suffix for the clip's first
camera (``view_dependent_prompting``, on by default), the plain prompt when it is off."""
from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the host puts its components
PROMPT = "a panda is dancing"


@pytest.fixture()
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host's prompt cache is relative to the working directory
    return tmp_path


def _clip(elevation: float, first_azimuth: float, frames: int = 4) -> dict:
    """A moving-camera clip: only its first camera chooses the view (upstream takes elevation[[0]] etc.)."""
    return {"elevation": torch.full((frames,), elevation, device=DEVICE),
            "azimuth": first_azimuth + torch.arange(frames, device=DEVICE, dtype=torch.float32) * 5.625,
            "camera_distances": torch.full((frames,), 2.5, device=DEVICE)}


@pytest.mark.parametrize("elevation,azimuth,suffix", [(0.0, 90.0, ", side view"), (0.0, 0.0, ", front view"),
                                                      (0.0, 180.0, ", back view"), (70.0, 30.0, ", overhead view")])
def test_video_text_is_the_prompt_with_the_first_cameras_view_suffix(threestudio, tiny_models, cwd, elevation, azimuth,
                                                                      suffix):
    from animate124.core.guidance import text_encoding

    folder = str(tiny_models["text-to-video"])
    processor = threestudio.find("a124-video-prompt-processor")({"pretrained_model_name_or_path": folder,
                                                                  "prompt": PROMPT})
    tokenizer, encoder = text_encoding.load_text_encoder(folder)
    expected = {text: text_encoding.encode(tokenizer, encoder, [text])[0] for text in (PROMPT, PROMPT + suffix, "")}
    for flag, text in ((None, PROMPT + suffix), (True, PROMPT + suffix), (False, PROMPT)):
        settings = {"pretrained_model_name_or_path": folder, "model_size": [64, 64]}
        if flag is not None:
            settings["view_dependent_prompting"] = flag
        guidance = threestudio.find("a124-video-sds-guidance")(settings)
        cond, uncond = guidance._text(processor(), *_clip(elevation, azimuth).values(), rgb_as_latents=False)
        torch.testing.assert_close(cond[0].cpu(), expected[text], msg=f"{flag}: {text!r}")
        torch.testing.assert_close(uncond[0].cpu(), expected[""])  # the negative prompt has no view suffix
