"""The pretrained models the configs load, as their repositories publish them: the one table of repo ids, folder
layouts, weight formats and sizes.

Read by the loaders (renamed ids, :func:`resolve_repo_id`), by ``make-tiny-models`` / ``--full-size`` (the layout each
imitates), and by ``animate124 models`` and the preflight (:func:`files_needed`: the files a load reads, their sizes,
whether the Hugging Face cache holds them).

Layouts as published on each repository's main branch:

- Stable Diffusion 1.5, ModelScope, Zero-1-to-3 XL: ``.safetensors`` (fp32) with an ``fp16`` variant beside them
  (``name.fp16.safetensors``);
- ZeroScope v2 576w and ControlNet-Tile: ``.bin`` pickles only, no ``fp16`` variant (ControlNet-Tile one fp32
  ``diffusion_pytorch_model.bin``; ZeroScope's U-Net pickle holds fp16 tensors, its VAE and text encoder fp32).

Sizes are parameters x bytes per weight (the headers add < 0.1 %); the parameter counts are the real architectures'
(``animate124/testing/full_size_models.py`` builds them; its test pins the counts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Part", "PublishedModel", "MODELS", "SD15", "CONTROLNET_TILE", "ZERO123_XL", "ZERO123", "MODELSCOPE",
           "ZEROSCOPE", "KINDS", "FileNeed", "ModelNeed", "LOADERS", "published", "resolve_repo_id", "files_needed",
           "cached_file", "folder_weights", "model_needs", "fetch_command", "hub_cli", "human_size"]

FP32, FP16 = 4, 2  # bytes per weight


ROLE_FOLDERS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer",
                "scheduler": "scheduler", "image_encoder": "image_encoder",
                "camera_projection": "clip_camera_projection", "feature_extractor": "feature_extractor",
                "controlnet": ""}
"""Role -> sub-folder, the same in every repository (diffusers' pipeline layout; a ControlNet is a model at the root)."""


@dataclass(frozen=True)
class Part:
    """One component of a repository."""

    role: str
    """A key of ``ROLE_FOLDERS``."""
    params: int = 0
    """Parameters of a weights part (0: configuration files only)."""
    default_bytes: int = FP32
    """Bytes per weight in the default (non-variant) file."""

    @property
    def folder(self) -> str:
        return ROLE_FOLDERS[self.role]

    @property
    def library(self) -> str:
        if self.role in ("text_encoder", "image_encoder"):
            return "transformers"
        return "diffusers" if self.params else "config"


@dataclass(frozen=True)
class PublishedModel:
    repo_id: str
    kind: str
    """The folder name of its tiny / full-size imitation (``make-tiny-models``)."""
    title: str
    parts: tuple[Part, ...]
    safetensors: bool
    """Weights as ``.safetensors`` (else ``.bin`` pickles only)."""
    fp16_variant: bool
    """``name.fp16.<ext>`` files beside the default ones."""
    old_ids: tuple[str, ...] = ()
    """Earlier names of the repository (a cache filled under one of them is used)."""
    revision: str = "main"
    pipeline: bool = True
    """Has a ``model_index.json`` (a diffusers pipeline folder)."""

    def part(self, role: str) -> Part:
        return next(p for p in self.parts if p.role == role)

    @property
    def ids(self) -> tuple[str, ...]:
        return (self.repo_id, *self.old_ids)


_TOKENIZER_FILES = (("merges.txt", 525_000), ("vocab.json", 1_060_000), ("special_tokens_map.json", 1_000),
                    ("tokenizer_config.json", 1_000))
_CONFIG_FILES = {"scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json"}
_SD_UNET, _VAE, _CLIP_L_TEXT = 859_520_964, 83_653_863, 123_060_480
_ZERO123_PARTS = (Part("unet", _SD_UNET + 4 * 320 * 3 * 3), Part("vae", _VAE), Part("image_encoder", 303_966_208),
                  Part("camera_projection", (768 + 4) * 768 + 768), Part("feature_extractor"), Part("scheduler"))


def _text_to_video_parts(unet_bytes: int = FP32) -> tuple[Part, ...]:
    return (Part("unet", 1_411_233_860, unet_bytes), Part("vae", _VAE), Part("text_encoder", 340_387_840),
            Part("tokenizer"), Part("scheduler"))


SD15 = PublishedModel(
    "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", "Stable Diffusion 1.5",
    (Part("unet", _SD_UNET), Part("vae", _VAE), Part("text_encoder", _CLIP_L_TEXT), Part("tokenizer"),
     Part("scheduler")),
    safetensors=True, fp16_variant=True, old_ids=("runwayml/stable-diffusion-v1-5",),
)
CONTROLNET_TILE = PublishedModel(
    "lllyasviel/control_v11f1e_sd15_tile", "controlnet-tile", "ControlNet 1.1 Tile for SD 1.5",
    (Part("controlnet", 361_279_120),), safetensors=False, fp16_variant=False, pipeline=False,
)
ZERO123_XL = PublishedModel("bennyguo/zero123-xl-diffusers", "zero123", "Zero-1-to-3 XL", _ZERO123_PARTS,
                            safetensors=True, fp16_variant=True)
ZERO123 = PublishedModel("bennyguo/zero123-diffusers", "zero123", "Zero-1-to-3 (not XL)", _ZERO123_PARTS,
                         safetensors=True, fp16_variant=True)
MODELSCOPE = PublishedModel(
    "ali-vilab/text-to-video-ms-1.7b", "text-to-video", "ModelScope text-to-video 1.7B",
    _text_to_video_parts(), safetensors=True, fp16_variant=True, old_ids=("damo-vilab/text-to-video-ms-1.7b",),
)
ZEROSCOPE = PublishedModel("cerspense/zeroscope_v2_576w", "zeroscope", "ZeroScope v2 576w",
                           _text_to_video_parts(unet_bytes=FP16), safetensors=False, fp16_variant=False)
MODELS: tuple[PublishedModel, ...] = (SD15, CONTROLNET_TILE, ZERO123_XL, ZERO123, MODELSCOPE, ZEROSCOPE)
"""Every model a shipped config (or the differences table's restore-upstream recipe) loads."""
KINDS: dict[str, PublishedModel] = {m.kind: m for m in (SD15, CONTROLNET_TILE, ZERO123_XL, MODELSCOPE, ZEROSCOPE)}
"""The tiny / full-size kind -> the repository whose layout it imitates."""

WEIGHT_NAMES = {"diffusers": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                "transformers": ("model", "pytorch_model")}
"""library -> (safetensors stem, pickle stem)."""


def published(name: str) -> PublishedModel | None:
    """The table entry for a repo id or one of its earlier names; None for anything else (a folder, another id)."""
    return next((m for m in MODELS if str(name) in m.ids), None)


# ---- what each loader reads ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loader:
    """What one component type reads from the model named by ``key`` of its config."""

    key: str
    default: str
    """The component's own default for ``key``."""
    roles: tuple[str, ...]
    fp16_roles: tuple[str, ...] = ()
    """Roles read as the fp16 variant (where the model has one) with ``half_precision_weights`` (default true)."""
    fp16_on_cpu: bool = False
    """The host's Zero123 asks for the variant on any device; ours only on CUDA."""
    pipeline: bool = False
    """Loaded as a diffusers pipeline (reads ``model_index.json``)."""


_KEY = "pretrained_model_name_or_path"
_HOST_SD = Loader(_KEY, "runwayml/stable-diffusion-v1-5", ("unet", "vae", "text_encoder", "scheduler"), pipeline=True)
LOADERS: dict[str, tuple[Loader, ...]] = {
    # the host's (threestudio 0.2.x): its SD pipeline is loaded without variant (the fp32 files, cast after loading)
    "stable-diffusion-unified-guidance": (_HOST_SD,),
    "stable-diffusion-guidance": (_HOST_SD,),
    "stable-diffusion-prompt-processor": (Loader(_KEY, "runwayml/stable-diffusion-v1-5", ("tokenizer", "text_encoder")),),
    "zero123-unified-guidance": (
        Loader(_KEY, ZERO123.repo_id, tuple(p.role for p in _ZERO123_PARTS),
               fp16_roles=("unet", "vae", "image_encoder", "camera_projection"), fp16_on_cpu=True, pipeline=True),),
    # ours: U-Nets, VAEs and ControlNets as the fp16 variant on CUDA; text encoders as published (fp32)
    "a124-video-sds-guidance": (Loader(_KEY, MODELSCOPE.repo_id, ("unet", "vae", "scheduler"), ("unet", "vae")),),
    "a124-video-prompt-processor": (Loader(_KEY, MODELSCOPE.repo_id, ("tokenizer", "text_encoder")),),
    "a124-controlnet-tile-guidance": (
        Loader(_KEY, SD15.repo_id, ("unet", "vae", "scheduler", "tokenizer", "text_encoder"), ("unet", "vae")),
        Loader("controlnet_name_or_path", CONTROLNET_TILE.repo_id, ("controlnet",), ("controlnet",))),
    "a124-textual-inversion-prompt-processor": (Loader(_KEY, SD15.repo_id, ("tokenizer", "text_encoder")),),
}
"""Component type -> what it loads. Types not listed (the oracle guidances, other extensions' components) load
nothing this table knows of."""


@dataclass(frozen=True)
class FileNeed:
    path: str
    """Relative to the repository / folder root."""
    size: int
    found: str | None = None
    """Where the file is (in the cache or the folder), None when it is missing."""


@dataclass
class ModelNeed:
    """One model (a repo id or a local folder) and every file the config's loaders read from it."""

    name: str
    local: bool
    model: PublishedModel | None = None
    cached_as: str | None = None
    """The repo id whose cache holds it when that is another name of the repository (a rename)."""
    users: list[str] = field(default_factory=list)
    """Who loads it: ``<slot>.<guidance|prompt_processor> (<stage it is first loaded in>)``."""
    files: list[FileNeed] = field(default_factory=list)
    unknown: bool = False
    """A repo id the table does not know: its files cannot be listed."""

    @property
    def revision(self) -> str:
        return self.model.revision if self.model else "main"

    @property
    def missing(self) -> list[FileNeed]:
        return [f for f in self.files if f.found is None]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _weight_file(model: PublishedModel, part: Part, fp16: bool) -> FileNeed:
    st_stem, bin_stem = WEIGHT_NAMES[part.library]
    variant = fp16 and model.fp16_variant
    stem = (st_stem if model.safetensors else bin_stem) + (".fp16" if variant else "")
    ext = "safetensors" if model.safetensors else "bin"
    return FileNeed(os.path.join(part.folder, f"{stem}.{ext}"), part.params * (FP16 if variant else part.default_bytes))


def _part_files(model: PublishedModel, part: Part, fp16: bool) -> list[FileNeed]:
    if part.role == "tokenizer":
        return [FileNeed(os.path.join(part.folder, name), size) for name, size in _TOKENIZER_FILES]
    if part.role in _CONFIG_FILES:
        return [FileNeed(os.path.join(part.folder, _CONFIG_FILES[part.role]), 1_000)]
    return [FileNeed(os.path.join(part.folder, "config.json"), 1_000), _weight_file(model, part, fp16)]


def files_needed(model: PublishedModel, roles, fp16_roles=(), pipeline: bool = False) -> list[FileNeed]:
    """The files a load of ``roles`` reads from ``model`` as published (``fp16_roles`` as the fp16 variant where the
    repository has one), in the table's order."""
    out = [FileNeed("model_index.json", 1_000)] if pipeline and model.pipeline else []
    for part in model.parts:
        if part.role in roles:
            out += _part_files(model, part, part.role in fp16_roles)
    return out


# ---- where the files are ------------------------------------------------------------------------------------------


def cached_file(repo_id: str, path: str, revision: str = "main") -> str | None:
    """The Hugging Face cache's copy of ``repo_id/path`` (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, path, revision=revision)
    except Exception:  # noqa: BLE001 - no hub library, or an id it rejects: not cached
        return None
    return found if isinstance(found, str) else None


def resolve_repo_id(name: str, revision: str = "main") -> str:
    """``name`` unless only another name of the same repository (``PublishedModel.old_ids``: a rename) is in the
    Hugging Face cache: then that name, so an offline run finds a cache filled under either name. A local folder
    or an id the table does not know is returned unchanged."""
    name = str(name)
    model = published(name)
    if model is None or os.path.isdir(name):
        return name
    probe = os.path.join(model.parts[0].folder, "config.json")
    if cached_file(name, probe, revision):
        return name
    return next((other for other in model.ids if other != name and cached_file(other, probe, revision)), name)


def folder_weights(folder: Path, library: str) -> list[Path]:
    """The weight files a loader accepts in a local folder: default or fp16 variant, safetensors or pickle."""
    return [p for stem in dict.fromkeys(WEIGHT_NAMES[library]) for ext in ("safetensors", "bin")
            for p in (folder / f"{stem}.{ext}", folder / f"{stem}.fp16.{ext}") if p.is_file()]


def _folder_files(root: Path, roles, pipeline: bool) -> list[FileNeed]:
    """What a load of ``roles`` finds in a local folder (any weight format it accepts), missing ones by their
    preferred name."""
    out = []
    if pipeline:
        out.append(_on_disk(root, "model_index.json"))
    for role in roles:
        part = Part(role, params=1 if role not in _CONFIG_FILES and role != "tokenizer" else 0)
        if part.library in WEIGHT_NAMES:
            out.append(_on_disk(root, os.path.join(part.folder, "config.json")))
            found = folder_weights(root / part.folder, part.library)
            stem = WEIGHT_NAMES[part.library][0]
            out.append(_on_disk(root, os.path.relpath(found[0], root)) if found else
                       FileNeed(os.path.join(part.folder, f"{stem}.safetensors (or .bin)"), 0))
        elif role == "tokenizer":
            out += [_on_disk(root, os.path.join(part.folder, n)) for n in ("vocab.json", "merges.txt")]
        else:
            out.append(_on_disk(root, os.path.join(part.folder, _CONFIG_FILES[role])))
    return out


def _on_disk(root: Path, rel: str) -> FileNeed:
    path = root / rel
    return FileNeed(rel, path.stat().st_size, str(path)) if path.is_file() else FileNeed(rel, 0)


def model_needs(slots, stages, cuda: bool = True) -> list[ModelNeed]:
    """Every model the ``stages`` load through the guidance ``slots`` (``step_plan.GuidanceSlot``), with the files
    each load reads and where they are: the Hugging Face cache (no network) or the local folder.

    ``cuda``: the run's device (our loaders read the fp16 variants only there; the tool assumes the GPU run).
    """
    stages_of: dict[str, list[str]] = {}  # slot -> the stages that use it, in order (it loads at the first)
    for stage in stages:
        for name in stage.guidances:
            stages_of.setdefault(name, []).append(stage.name)
    needs: dict[str, ModelNeed] = {}
    for slot_name, stage_names in stages_of.items():
        slot = slots[slot_name]
        for section, type_name, cfg in (("guidance", slot.guidance_type, slot.guidance),
                                        ("prompt_processor", slot.prompt_processor_type, slot.prompt_processor)):
            for loader in LOADERS.get(type_name or "", ()):
                name = str((cfg or {}).get(loader.key) or loader.default)
                half = bool((cfg or {}).get("half_precision_weights", True))
                fp16 = loader.fp16_roles if half and (cuda or loader.fp16_on_cpu) else ()
                need = needs.get(name) or needs.setdefault(name, _new_need(name))
                user = f"{slot_name}.{section} ({', '.join(stage_names)})"
                if user not in need.users:
                    need.users.append(user)
                _add_files(need, loader.roles, fp16, loader.pipeline)
    for need in needs.values():  # folder by folder
        need.files.sort(key=lambda f: (os.path.dirname(f.path), f.path))
    return list(needs.values())


def _new_need(name: str) -> ModelNeed:
    local = os.path.isdir(os.path.expanduser(name))
    model = None if local else published(name)
    need = ModelNeed(name, local, model, unknown=not local and model is None)
    if model is not None:
        resolved = resolve_repo_id(name, model.revision)
        need.cached_as = resolved if resolved != name else None
    return need


def _add_files(need: ModelNeed, roles, fp16_roles, pipeline: bool) -> None:
    if need.local:
        new = _folder_files(Path(os.path.expanduser(need.name)), roles, pipeline)
    elif need.model is not None:
        repo = need.cached_as or need.name
        new = [FileNeed(f.path, f.size, cached_file(repo, f.path, need.revision))
               for f in files_needed(need.model, roles, fp16_roles, pipeline)]
    else:
        return
    have = {f.path for f in need.files}
    need.files += [f for f in new if f.path not in have]


def hub_cli() -> str:
    """The hub's command line as installed here: ``hf`` from huggingface_hub 1.0, ``huggingface-cli`` before."""
    try:
        from importlib.metadata import version

        return "hf" if int(version("huggingface_hub").split(".")[0]) >= 1 else "huggingface-cli"
    except Exception:  # noqa: BLE001 - not installed: the long-standing name
        return "huggingface-cli"


def fetch_command(needs: list[ModelNeed]) -> str:
    """One shell command that downloads every missing file of the hub models in ``needs`` ("" when none is)."""
    cli = hub_cli()
    parts = [f"{cli} download {n.model.repo_id} {' '.join(f.path for f in n.missing)} --revision {n.revision}"
             for n in needs if n.model is not None and not n.local and n.missing]
    return " && ".join(parts)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
