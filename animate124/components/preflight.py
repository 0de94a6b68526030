"""Everything a run needs, checked before step 0, for every stage at once.

A mistake in the refine stage's inputs would otherwise surface only when refinement starts, most of a run later.
:func:`check_system` runs in the system's ``configure`` (before the Trainer starts and before any diffusion model
loads); the data module, built just before it from ``data`` alone, checks its own settings and files when it is built
and again at its setup (:func:`check_data`); :class:`OutputFolderCheck` runs at ``on_fit_start`` (the first moment
the output folder is known). Each check reports every problem it finds at once, one line each naming the fix, in a
single :class:`PreflightError`; nothing starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import pytorch_lightning as pl
import threestudio
import torch

from animate124.core.io.safe_files import UnsafeFileError

TEXTUAL_INVERSION_PP = "a124-textual-inversion-prompt-processor"
CONTROLNET_GUIDANCE = "a124-controlnet-tile-guidance"
VIDEO_GUIDANCE = "a124-video-sds-guidance"
LOWVRAM_CONFIG = "configs/animate124-lowvram.yaml"
# a hub id: "name" or "owner/name" of letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PreflightError(ValueError):
    """The config cannot run; the message holds one line per problem."""

    def __init__(self, problems: List[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"{len(problems)} problem(s) found before step 0; nothing was started:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def raise_if(problems: List[str]) -> None:
    if problems:
        raise PreflightError(problems)


# ---- the system ---------------------------------------------------------------------------------------------------


def check_system(cfg: Any, slots: Dict[str, Any], stages: Iterable[Any], device: Optional[torch.device] = None) -> None:
    """All system-side checks: component types and keys, prompts, embeddings, sizes, model paths, the GPU.

    ``slots`` are the parsed guidance slots (name -> object with guidance_type, guidance, prompt_processor_type,
    prompt_processor, input), ``stages`` the parsed stages (to know which slots ever run), ``device`` the one the
    host places components on (None: ``threestudio.utils.misc.get_device()``).
    """
    problems: List[str] = []
    stages = list(stages)
    used = {g for stage in stages for g in stage.guidances}
    problems += _unused_host_fields(cfg)
    for part in ("geometry", "material", "background", "renderer", "exporter"):
        problems += _component(f"system.{part}", getattr(cfg, f"{part}_type", ""), getattr(cfg, part, {}) or {})
    well_formed = True
    for name, slot in slots.items():
        if name not in used:
            continue  # declared but never run: nothing loads it
        where = f"system.guidances.{name}"
        problems += _component(f"{where}.guidance", slot.guidance_type, slot.guidance)
        if slot.prompt_processor_type:
            problems += _component(f"{where}.prompt_processor", slot.prompt_processor_type, slot.prompt_processor)
            problems += _prompt(where, slot)
        problems += _guidance_values(where, slot)
        for key in ("pretrained_model_name_or_path", "controlnet_name_or_path"):
            for section in ("guidance", "prompt_processor"):
                value = (getattr(slot, section) or {}).get(key)
                if value:
                    bad = _model_path(f"{where}.{section}.{key}", str(value))
                    well_formed &= not bad
                    problems += bad
        cond = (slot.guidance or {}).get("cond_image_path")
        if cond is not None:
            problems += check_image(f"{where}.guidance.cond_image_path", str(cond), need_alpha=True)
    device = _device(device)
    if well_formed:
        problems += model_files(slots, stages, cuda=device.type == "cuda")
    problems += check_device(cfg, device)
    raise_if(problems)


def _unused_host_fields(cfg: Any) -> List[str]:
    """Host fields a124-system does not read: a value there is a mistake that would otherwise be ignored."""
    problems = []
    loss = dict(getattr(cfg, "loss", None) or {})
    if loss:
        from animate124.core.training.losses import LOSSES

        problems.append(
            f"system.loss has keys {sorted(loss)}, which a124-system does not read: put loss weights in "
            f"system.stages.<stage>.loss_weights (keys: a guidance slot name, <slot>_<term>, or one of "
            f"{list(LOSSES)})"
        )
    for key in ("guidance_type", "prompt_processor_type"):
        if getattr(cfg, key, ""):
            problems.append(f"system.{key}={getattr(cfg, key)!r} is not read by a124-system: declare the guidance as "
                            "a slot under system.guidances and list it in the stages that use it")
    return problems


def registered_names() -> List[str]:
    return sorted(threestudio.__modules__)


def _component(where: str, type_name: str, settings: Any) -> List[str]:
    """The type is registered (else: the closest registered names) and every key is a field of its Config."""
    if not type_name:
        return []
    names = [n for part in str(type_name).split(":") for n in part.split(",")]
    problems, classes = [], []
    for name in names:
        if name not in threestudio.__modules__:
            close = difflib.get_close_matches(name, registered_names(), n=3, cutoff=0.6)
            hint = f"did you mean {close}?" if close else "see the README for the types this extension registers"
            problems.append(f"{where}_type={name!r} is not a registered type: {hint}")
        else:
            classes.append(threestudio.__modules__[name])
    if problems or not classes:
        return problems
    allowed = set()
    for cls in classes:
        config = getattr(cls, "Config", None)
        if config is None or not dataclasses.is_dataclass(config):
            return []  # a component without a dataclass Config takes free keys
        allowed |= {f.name for f in dataclasses.fields(config)}
    return _unknown_keys(where, type_name, allowed, settings)


def _unknown_keys(where: str, type_name: str, allowed: set, settings: Any) -> List[str]:
    problems = []
    for key in sorted(set(map(str, dict(settings or {}))) - allowed):
        close = difflib.get_close_matches(key, sorted(allowed), n=3, cutoff=0.6)
        hint = f"did you mean {close}?" if close else f"allowed keys: {sorted(allowed)}"
        problems.append(f"{where}.{key} is not a setting of {type_name!r}: {hint}")
    return problems


def check_system_settings(config_cls: Any, settings: Any) -> None:
    """The system's own keys, before the host parses them (which would stop at the first with a bare TypeError):
    every unknown key with the closest ones, and every text setting left empty (``system.prompt=`` gives None)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    problems = _unknown_keys("system", "a124-system", set(fields), settings)
    for name, value in dict(settings or {}).items():
        if name in fields and fields[name].type in (str, "str") and value is None:
            problems.append(f"system.{name} is empty (None): give it a value, e.g. system.{name}='...'")
    raise_if(problems)


def _prompt(where: str, slot: Any) -> List[str]:
    pp = slot.prompt_processor or {}
    prompt = pp.get("prompt", "")
    if not isinstance(prompt, str) or not prompt.strip():
        return [f"{where}.prompt_processor.prompt is empty: write the text this guidance should follow "
                "(system.prompt / system.motion_prompt / system.refine_prompt)"]
    if slot.prompt_processor_type != TEXTUAL_INVERSION_PP:
        return []
    from animate124.core.guidance.textual_inversion import PLACEHOLDER

    placeholder = pp.get("placeholder", PLACEHOLDER)
    problems = []
    if placeholder not in prompt:
        problems.append(f"{where}.prompt_processor.prompt={prompt!r} has no {placeholder!r}: write it where the "
                        f"learned subject goes, e.g. system.refine_prompt='a {placeholder} is dancing'")
    model = str(pp.get("pretrained_model_name_or_path", ""))
    problems += check_embedding(f"{where}.prompt_processor.learned_embeds_path", pp.get("learned_embeds_path") or "",
                                _text_encoder_width(model), _local_tokenizer(model))
    return problems


def _local_tokenizer(model: str) -> Any:
    """The model's tokenizer from its folder or the hub cache (nothing downloaded); None when not there, in which case
    the prompt processor runs the same vocabulary check when it loads."""
    from animate124.core.guidance.text_encoding import load_tokenizer

    try:
        return load_tokenizer(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - not local, not cached, or not a CLIP tokenizer
        return None


def check_embedding(where: str, path: str, width: Optional[int], tokenizer: Any = None) -> List[str]:
    """A textual-inversion file: exists, loads without running code, holds one token of the text encoder's width,
    and (given the tokenizer) that token is not already a word of the vocabulary."""
    from animate124.core.guidance.textual_inversion import (embedding_tokens, ordinary_word, read_learned_embeds,
                                                            shadow_text)

    if not path:
        return [f"{where} is empty: make the embedding with `animate124 invert IMAGE --token ... --out DIR` and set "
                "system.learned_embeds_path to it"]
    try:
        name, rows = read_learned_embeds(path)
    except FileNotFoundError:
        return [f"{where}={path!r} does not exist: make it with `animate124 invert` or fix the path"]
    except UnsafeFileError as error:
        return [f"{where}: {error}"]
    except (ValueError, RuntimeError, OSError) as error:
        return [f"{where}={path!r} cannot be read ({first_line(error)}): re-export it with `animate124 invert`"]
    if width is not None and rows.shape[-1] != width:
        return [f"{where}={path!r} holds a {rows.shape[-1]}-d embedding but the text encoder is {width}-d: invert "
                "against the same model as the prompt processor's pretrained_model_name_or_path"]
    for token in embedding_tokens(name, rows.shape[0]) if tokenizer is not None else ():
        word = ordinary_word(tokenizer, token)
        if word is not None:
            return [f"{where}={path!r} holds token {token!r}, {shadow_text(token, word)}"]
    return []


def _text_encoder_width(model: str) -> Optional[int]:
    """hidden_size from the local folder or the hub cache; None when unknown offline."""
    config = Path(model) / "text_encoder" / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "text_encoder/config.json")
        except Exception:  # noqa: BLE001 - not a hub id, no cache: the width is checked when the model loads
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return int(json.loads(config.read_text())["hidden_size"])
    except (OSError, ValueError, KeyError):
        return None


def _guidance_values(where: str, slot: Any) -> List[str]:
    g = slot.guidance or {}
    problems = []
    if slot.guidance_type == CONTROLNET_GUIDANCE:
        size = g.get("fixed_size", 1024)
        if not isinstance(size, int) or size < 64 or size % 64:
            fix = max(64, round(int(size) / 64) * 64) if isinstance(size, (int, float)) else 512
            problems.append(f"{where}.guidance.fixed_size={size!r} must be a positive multiple of 64 (the latents are "
                            f"fixed_size/8 and the U-Net halves them 3 times): use e.g. {fix}")
        n = g.get("n_frames", 2)
        if not isinstance(n, int) or n < 1:
            problems.append(f"{where}.guidance.n_frames={n!r} must be >= 1 (frames scored per step; default 2)")
    if slot.guidance_type == VIDEO_GUIDANCE and g.get("model_size") is not None:
        size = list(g["model_size"])
        if len(size) != 2 or not all(isinstance(s, int) and s >= 64 and s % 64 == 0 for s in size):
            problems.append(f"{where}.guidance.model_size={size} must be [H, W], each a positive multiple of 64 "
                            "(ModelScope: [256, 256], ZeroScope: [320, 576]) or null for the model's own size")
    for key in ("guidance_scale", "min_step_percent", "max_step_percent"):
        value = g.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            problems.append(f"{where}.guidance.{key}={value} must be >= 0")
    lo, hi = g.get("min_step_percent"), g.get("max_step_percent")
    if all(isinstance(v, (int, float)) for v in (lo, hi)) and not 0 <= lo <= hi <= 1:
        problems.append(f"{where}.guidance.min_step_percent={lo}, max_step_percent={hi}: need 0 <= min <= max <= 1")
    return problems


def _model_path(where: str, value: str) -> List[str]:
    """A local folder, or something shaped like a hub id; no network is used. An absent path that looks like a path
    is a typo, not a hub id."""
    if os.path.isdir(os.path.expanduser(value)):
        return []
    looks_like_path = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or os.sep + os.sep in value
    if looks_like_path or not _HUB_ID.match(value):
        return [f"{where}={value!r} is neither a local folder nor a hub id (owner/name): fix the path, or make the "
                "tiny test models with `animate124 make-tiny-models DIR`"]
    return []


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def model_files(slots: Dict[str, Any], stages: Iterable[Any], cuda: bool) -> List[str]:
    """Every file the stages' loaders read (``core/guidance/published_models.py``, the list ``animate124 models``
    prints), checked in local folders always and in the Hugging Face cache when ``HF_HUB_OFFLINE`` is set: one line
    per model that lacks some, then the one command that fetches every missing hub file."""
    from animate124.core.guidance.published_models import fetch_command, hub_cli, human_size, model_needs

    needs = model_needs(slots, stages, cuda=cuda)
    problems = []
    for need in needs:
        who = ", ".join(need.users)
        names = ", ".join(f.path for f in need.missing[:4]) + (", ..." if len(need.missing) > 4 else "")
        if need.local and need.missing:
            problems.append(f"the folder {need.name!r} ({who}) lacks {len(need.missing)} of the {len(need.files)} "
                            f"files its loaders read: {names}; fix the path, or write the folder again (`animate124 "
                            "make-tiny-models DIR` for test models)")
        elif offline() and need.model is not None and need.missing:
            size = human_size(sum(f.size for f in need.missing))
            problems.append(f"{need.name} ({need.model.title}; {who}) is not fully in the Hugging Face cache and "
                            f"HF_HUB_OFFLINE is set: {len(need.missing)} of {len(need.files)} files missing "
                            f"({size}): {names}")
        elif offline() and need.unknown and not _cached_config(need.name):
            problems.append(f"{need.name} ({who}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                            f"download it once (`{hub_cli()} download {need.name}`) or point at a local folder")
    command = fetch_command(needs) if offline() else ""
    if command:
        problems.append(f"fetch every missing file where the network allows, with one command (`animate124 models "
                        f"CONFIG` lists them): {command}")
    return problems


def _cached_config(repo_id: str) -> bool:
    from animate124.core.guidance.published_models import cached_file

    return any(cached_file(repo_id, name) for name in ("model_index.json", "config.json"))


# ---- the GPU --------------------------------------------------------------------------------------------------------


def _device(device: Optional[torch.device]) -> torch.device:
    """``device``, or the one the host places components on."""
    if device is None:
        from threestudio.utils.misc import get_device

        device = get_device()
    return torch.device(device)


def check_device(cfg: Any, device: Optional[torch.device] = None) -> List[str]:
    """CUDA present when the host places components on CUDA, and enough free memory for ``min_free_vram_gb``."""
    device = _device(device)
    if device.type != "cuda":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    listed = [v for v in visible.split(",") if v.strip()]
    if not torch.cuda.is_available():
        if torch.version.cuda is not None and listed:  # launch.py sets it from --gpu: an index this machine lacks
            return [f"CUDA_VISIBLE_DEVICES={visible} (launch.py sets it from --gpu) leaves torch no GPU: give --gpu "
                    "an index that `nvidia-smi -L` lists (--gpu 0 is the first GPU)"]
        fix = ("torch is a CPU-only build: install a CUDA build of torch" if torch.version.cuda is None else
               f"torch is built for CUDA {torch.version.cuda} but sees no GPU: check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
        return [f"CUDA is not available (torch {torch.__version__}): animate124 trains on an NVIDIA GPU; {fix}; "
                "without a GPU, `animate124 launch --config .../animate124-smoke.yaml --train` runs the smoke config on "
                "the CPU"]
    if listed and all(v.strip().isdigit() for v in listed) and torch.cuda.device_count() < len(listed):
        return [f"CUDA_VISIBLE_DEVICES={visible} (launch.py sets it from --gpu) lists {len(listed)} GPUs but torch "
                f"sees {torch.cuda.device_count()}: an index is not one of this machine's GPUs; give --gpu indices "
                "that `nvidia-smi -L` lists"]
    need = getattr(cfg, "min_free_vram_gb", None)
    if not need:
        return []
    free, total = torch.cuda.mem_get_info(torch.device(device))
    free_gb = free / 2**30
    if free_gb < need:
        return [f"{free_gb:.1f} GiB of GPU memory is free on {device} ({total / 2**30:.0f} GiB total) but this config "
                f"needs about {need:g} GiB (system.min_free_vram_gb): free the GPU, use a lighter config "
                f"({LOWVRAM_CONFIG}), or set system.min_free_vram_gb=null to try anyway"]
    return []


# ---- the data -------------------------------------------------------------------------------------------------------


def check_data(cfg: Any) -> None:
    """The data module's problems, raised: when it is built (before the system and any model) and at its setup
    (files written or removed since)."""
    raise_if(data_problems(cfg))


def data_problems(cfg: Any) -> List[str]:
    """The data module's sizes and probabilities, then its image and depth (cfg: its structured config object)."""
    problems = []
    sizes = {"data.height": cfg.height, "data.width": cfg.width, "data.eval_height": cfg.eval_height,
             "data.eval_width": cfg.eval_width, "data.random_camera.height": cfg.random_camera.height,
             "data.random_camera.width": cfg.random_camera.width, "data.random_camera.batch_size":
             cfg.random_camera.batch_size, "data.video.num_frames": cfg.video.num_frames,
             "data.video.height": cfg.video.height, "data.video.width": cfg.video.width,
             "data.n_val_frames": cfg.n_val_frames, "data.n_test_views": cfg.n_test_views,
             "data.n_test_frames": cfg.n_test_frames}
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r} must be a positive integer (e.g. 16 frames, 128 pixels)")
    for key in ("zero_rate", "mirror_prob", "fixed_camera_prob"):
        value = getattr(cfg.video, key)
        if not 0.0 <= value <= 1.0:
            problems.append(f"data.video.{key}={value} is a probability: use a value in [0, 1]")
    problems += check_image("data.image_path", cfg.image_path, need_alpha=True)
    if cfg.depth_path:
        problems += check_image("data.depth_path", cfg.depth_path, need_alpha=False)
    return problems


def check_image(where: str, path: str, need_alpha: bool) -> List[str]:
    """Exists, decodes, and (need_alpha) has an alpha channel with an opaque object."""
    if not path:
        return [f"{where} is empty: point it at the rgba.png that `animate124 preprocess IMAGE --out DIR` writes"]
    if not os.path.isfile(path):
        return [f"{where}={path!r} does not exist: fix the path (make an rgba.png with `animate124 preprocess`)"]
    from PIL import Image, UnidentifiedImageError

    from animate124.core.io.images import normalise_mode

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            rgba = normalise_mode(image)  # the data module's reading: gray + alpha and palette transparency count
            alpha = rgba.getchannel("A") if rgba.mode == "RGBA" else None
            extrema = alpha.getextrema() if alpha is not None else None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        return [f"{where}={path!r} is not a readable image ({first_line(error)}): give a PNG"]
    if not need_alpha:
        return []
    if alpha is None:
        return [f"{where}={path!r} has no alpha channel (mode {mode}): run `animate124 preprocess` on it to cut out "
                "the object"]
    if extrema[1] == 0:
        return [f"{where}={path!r} is fully transparent (alpha 0 everywhere): the object must be opaque; run "
                "`animate124 preprocess` on the original photo"]
    return []


def first_line(error: BaseException) -> str:
    """``TypeName: the message's first line``, for a one-line problem."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ---- checkpoints from other runs -------------------------------------------------------------------------------------

# state-dict prefix -> the settings that size those tensors (most specific first)
SIZE_SETTINGS = (
    (("geometry.field.encoding.", "geometry.field.encoding_time.", "frozen_geometry.field.encoding"),
     ("geometry.pos_encoding_config",)),
    (("geometry.field.density_network.layers.0.", "geometry.field.feature_network.layers.0."),
     ("geometry.pos_encoding_config", "geometry.mlp_network_config")),
    (("geometry.field.feature_network.",), ("geometry.mlp_network_config", "geometry.n_feature_dims")),
    (("geometry.field.density_network.",), ("geometry.mlp_network_config",)),
    (("renderer.estimator.", "frozen_estimator."), ("renderer",)),
    (("background.",), ("background",)),
)


def check_checkpoint_file(where: str, path: str) -> List[str]:
    """``system.weights`` / ``resume`` names a checkpoint file (not a folder, not a missing path)."""
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpts", "last.ckpt")
        return [f"{where}={path} is a folder: give its checkpoint, e.g. {where}={inside}"]
    if not os.path.isfile(path):
        return [f"{where}={path} does not exist: give the last.ckpt of the earlier stage's run "
                "(outputs/<name>/<trial>/ckpts/last.ckpt)"]
    return []


def checkpoint_size_problems(where: str, path: str, state_dict: Dict[str, Any], module: Any,
                             cfg: Any = None) -> List[str]:
    """Tensors of ``state_dict`` whose shape differs from ``module``'s (a run with another grid size, MLP width,
    occupancy resolution ...), each with the settings that size it; where the checkpoint's run left its
    ``configs/parsed.yaml`` beside ``ckpts/``, the differing values themselves. None: no problem."""
    own = module.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape)]
    if not mismatched:
        return []
    settings: List[str] = []
    for key, _, _ in mismatched:
        for prefixes, keys in SIZE_SETTINGS:
            if key.startswith(prefixes):
                settings += [k for k in keys if k not in settings]
                break
    tensors = "; ".join(f"{k} {list(a)} in the checkpoint, {list(b)} here" for k, a, b in mismatched[:4])
    more = f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else ""
    differing = _differing_settings(path, settings, cfg)
    fix = (f"its run used {', '.join(differing)}: set them alike" if differing else
           f"set {', '.join('system.' + s for s in settings) or 'the sizes'} as in that run")
    return [f"{where}={path} holds tensors of other sizes than this config makes ({tensors}{more}): {fix}, or "
            "start without it"]


def _differing_settings(path: str, settings: List[str], cfg: Any) -> List[str]:
    """``system.<key>=<value>`` of the checkpoint's run for each leaf under ``settings`` that differs from ``cfg``."""
    parsed = Path(path).resolve().parent.parent / "configs" / "parsed.yaml"
    if cfg is None or not parsed.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        theirs = OmegaConf.to_container(OmegaConf.load(parsed), resolve=False).get("system", {})
        ours = cfg if isinstance(cfg, dict) else OmegaConf.to_container(OmegaConf.create(cfg), resolve=False)
    except Exception:  # noqa: BLE001 - an unreadable parsed.yaml: the generic hint
        return []

    def leaves(node: Any, prefix: str) -> Dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}.{key}").items()}
        return {prefix: node}

    found = []
    for setting in settings:
        a = leaves(_get(theirs, setting), setting)
        b = leaves(_get(ours, setting), setting)
        found += [f"system.{k}={a[k]!r} (here {b.get(k, '<unset>')!r})" for k in a if a[k] != b.get(k, a[k])]
    return found


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# ---- the schedule ----------------------------------------------------------------------------------------------------


def check_max_steps(max_steps: Optional[int], stages: Iterable[Any]) -> List[str]:
    """trainer.max_steps against the stages' sum (known at fit start): more steps than the stages hold would repeat the
    last stage, unasked (fewer is a shortened run, allowed)."""
    from animate124.core.training.stages import total_steps

    stages = tuple(stages)
    total = total_steps(stages)
    if max_steps is None or max_steps < 0 or max_steps > total:
        extra = "no end" if max_steps is None or max_steps < 0 else f"{max_steps - total} more steps"
        return [f"trainer.max_steps={max_steps} but the stages sum to {total} steps: the run would repeat stage "
                f"{stages[-1].name!r} for {extra}; set trainer.max_steps to {total} (the shipped configs set it to "
                "${a124_total_steps:${system.stages}}, the stages' sum) or lengthen a stage"]
    return []


# ---- the output folder -----------------------------------------------------------------------------------------------


class OutputFolderCheck(pl.Callback):
    """At fit start: the trial folder is writable, its disk holds the checkpoints this run will write, and a run that
    does not resume does not train into a folder holding an earlier run's results."""

    def __init__(self, margin_gb: float = 1.0) -> None:
        super().__init__()
        self.margin_gb = margin_gb

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or getattr(pl_module, "_save_dir", None) is None:
            return
        folder = os.path.dirname(pl_module.get_save_dir())
        need = self.margin_gb * 2**30 + checkpoint_bytes(pl_module) * planned_checkpoints(trainer)
        problems = check_output_folder(folder, need)
        if getattr(trainer, "ckpt_path", None) is None:
            problems += check_no_earlier_run(folder)
        raise_if(problems)


def check_no_earlier_run(folder: str) -> List[str]:
    """A fresh run (no ``resume=``) must not write over an earlier run's checkpoints, stage records or renders, as
    happens with ``use_timestamp=false`` and a tag used before."""
    found = []
    ckpts = os.path.join(folder, "ckpts")
    if os.path.isdir(ckpts) and any(name.endswith(".ckpt") for name in os.listdir(ckpts)):
        found.append("ckpts/*.ckpt")
    if os.path.isfile(os.path.join(folder, "stages.json")):
        found.append("stages.json")
    save = os.path.join(folder, "save")
    if os.path.isdir(save) and os.listdir(save):
        found.append("save/")
    if not found:
        return []
    return [f"the trial folder {folder!r} already holds an earlier run ({', '.join(found)}): resume it with "
            f"resume={os.path.join(ckpts, 'last.ckpt')}, or start a new trial (another tag, or use_timestamp=true); "
            "nothing of it was overwritten"]


def check_output_folder(folder: str, need_bytes: float) -> List[str]:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".a124-write-test-"):
            pass
    except OSError as error:
        return [f"the output folder {folder!r} is not writable ({first_line(error)}): set exp_root_dir to a folder "
                "you can write"]
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        return [f"the output folder {folder!r} has {free / 2**30:.1f} GiB free but this run writes about "
                f"{need_bytes / 2**30:.1f} GiB (checkpoints and renders): free space or set exp_root_dir elsewhere"]
    return []


def checkpoint_bytes(pl_module) -> int:
    """Parameters and buffers, plus Adam's two moments per trainable parameter."""
    params = sum(p.numel() * p.element_size() for p in pl_module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in pl_module.buffers())
    return 3 * params + buffers


def planned_checkpoints(trainer) -> int:
    every = [getattr(cb, "_every_n_train_steps", 0) for cb in trainer.checkpoint_callbacks]
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0
    n = sum(steps // e for e in every if e) + len(trainer.checkpoint_callbacks)  # periodic + last
    return max(n, 1)
