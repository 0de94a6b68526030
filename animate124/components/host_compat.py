"""Host quirks, in one place, each with its reason.

* ``zero123`` module alias: Zero123 diffusers folders name their camera projection's library ``zero123`` (the host's
  ``extern/zero123.py``); diffusers >= 0.3x no longer imports a library it is only named by, so the host's
  ``zero123-unified-guidance`` fails to load them. :func:`alias_host_zero123` makes that name resolve to the host
  module (a no-op where ``extern`` is not importable).
* ``${a124_tag:PROMPT}`` and ``${a124_total_steps:${system.stages}}`` config resolvers
  (:func:`register_config_resolvers`, called by the components package, since launch.py imports the extension before
  it loads the config).
* :func:`video_format`: the host's ``save_img_sequence`` writes mp4 only through imageio-ffmpeg.
* :func:`load_weights_reporting`: the host's ``load_weights`` loads with ``strict=False`` and says nothing about keys
  that did not match, so a renamed parameter silently stays at its initial value.
"""
from __future__ import annotations

import importlib.util
import sys

import threestudio
from omegaconf import OmegaConf

__all__ = ["alias_host_zero123", "video_format", "load_weights_reporting", "register_config_resolvers"]


def alias_host_zero123() -> None:
    if "zero123" not in sys.modules:
        try:
            import extern.zero123 as host_zero123
        except ImportError:
            return
        sys.modules["zero123"] = host_zero123


def video_format() -> str:
    """mp4 needs imageio-ffmpeg (imageio otherwise picks a writer that rejects fps); fall back to gif, warned."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "mp4"
    threestudio.warn("imageio-ffmpeg is not installed: writing videos as gif (pip install imageio-ffmpeg for mp4)")
    return "gif"


def load_weights_reporting(module, weights: str, ignore_modules, strict: bool, skip_missing: tuple = ()) -> dict:
    """Load ``weights`` like the host, then report every missing / unexpected key (raise when ``strict``).

    ``skip_missing``: prefixes of keys that may legitimately be absent (e.g. a copy made later in the run).
    Returns ``{"missing": [...], "unexpected": [...]}``."""
    from threestudio.utils.misc import load_module_weights

    from animate124.components import preflight
    from animate124.core.io.safe_files import weights_only_pickles

    preflight.raise_if(preflight.check_checkpoint_file("system.weights", str(weights)))
    try:
        # the host's torch.load asks for the whole pickle; a checkpoint from elsewhere must not run code on load
        with weights_only_pickles() as refused:
            state_dict, _, _ = load_module_weights(weights, ignore_modules=ignore_modules, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - not a checkpoint (a config, a safetensors file, a truncated file)
        preflight.raise_if([f"system.weights: {line}" for line in refused])
        preflight.raise_if([f"system.weights={weights} cannot be read as a threestudio checkpoint "
                            f"({preflight.first_line(error)}): give the ckpts/last.ckpt of the earlier stage's run"])
    # load_state_dict stops at the first size mismatch with a traceback that names no setting
    preflight.raise_if(preflight.checkpoint_size_problems("system.weights", str(weights), state_dict, module,
                                                          getattr(module, "cfg", None)))
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip_missing)]
    unexpected = list(result.unexpected_keys)
    msg = f"loaded {weights}: {len(state_dict)} tensors; missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}"
    if (missing or unexpected) and strict:
        raise ValueError(msg + " (strict_weights: true)")
    (threestudio.warn if missing or unexpected else threestudio.info)(msg)
    return {"missing": missing, "unexpected": unexpected}


def _tag(s, sub: str = "_") -> str:
    """The run folder's tag from a prompt: the host's rmspace, but an empty or missing prompt gives "" instead of an
    interpolation error, so the preflight can say which prompt is empty."""
    return str(s or "").strip().replace(" ", sub)


def register_config_resolvers() -> None:
    """``${a124_tag:PROMPT}`` and ``${a124_total_steps:${system.stages}}`` (the configs' trainer.max_steps: the
    stages' sum, so an override of one stage's steps changes it too) for our configs (idempotent)."""
    from animate124.core.training.stages import stage_total

    OmegaConf.register_new_resolver("a124_tag", _tag, replace=True)
    OmegaConf.register_new_resolver("a124_total_steps", stage_total, replace=True)
