"""List every pretrained model a config's stages load, whether it is already here, and fetch what is missing.

    animate124 models CONFIG [key=value ...]           offline: nothing is downloaded
    animate124 models CONFIG --fetch                   download the missing files (where the network allows)

For each model (a repo id or a local folder): who loads it and in which stage, each file the loaders read with its
size, and where it is (the Hugging Face cache, the folder) or that it is missing; then one command that downloads
every missing file (`hf download` / `huggingface-cli download REPO FILES... --revision ...`). Files as published and
as the loaders ask for them on a GPU (the fp16 variants where a repository has them). The list is the one the
preflight checks before step 0 when HF_HUB_OFFLINE=1 or a local folder is given (`core/guidance/published_models.py`).

Exit status: 0 when every file is there, 1 when some are missing (or could not be fetched).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DYNAMIC_KEYS = ("pretrained_model_name_or_path", "controlnet_name_or_path", "half_precision_weights")
"""The only settings read from a slot: resolving others (``cond_image_path: ${data.image_path}``) could run the smoke
config's asset maker."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="CONFIG", help="a config (e.g. configs/animate124.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, as launch.py takes them (e.g. system.guidances.video.guidance."
                             "pretrained_model_name_or_path=cerspense/zeroscope_v2_576w)")
    parser.add_argument("--fetch", action="store_true", help="download the missing files into the Hugging Face cache")


def run(args: argparse.Namespace) -> int:
    needs = config_needs(args.config, args.overrides)
    print(report(args.config, needs))
    if args.fetch and any(n.missing for n in needs if n.model and not n.local):
        fetch(needs)
        needs = config_needs(args.config, args.overrides)
        print(report(args.config, needs))
    missing = [f for n in needs for f in n.missing] + [n for n in needs if n.unknown and not _unknown_cached(n)]
    return 1 if missing else 0


def config_needs(config: Path, overrides=()) -> list:
    """The config's models and files (``published_models.model_needs`` for a GPU run), read without running any of
    its resolvers except the tiny-models folder."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from animate124.core.guidance.published_models import model_needs
    from animate124.core.training.stages import parse_stages
    from animate124.core.training.step_plan import parse_slots
    from animate124.testing.smoke_assets import register_smoke_resolver
    from animate124.tools.cli import ToolError

    if not config.is_file():
        raise ToolError(f"{str(config)!r} is not a file: give a config, e.g. configs/animate124.yaml")
    register_smoke_resolver()  # the smoke config's model folders (its asset maker is never resolved here)
    try:
        cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(cfg.system.guidances, resolve=False) or {}
        slots = {}
        for name, entry in raw.items():
            entry = dict(entry)
            for section in ("guidance", "prompt_processor"):
                entry[section] = {k: OmegaConf.select(cfg, f"system.guidances.{name}.{section}.{k}")
                                  for k in DYNAMIC_KEYS if k in (entry.get(section) or {})}
            slots[name] = entry
        stages = parse_stages(OmegaConf.to_container(cfg.system.stages, resolve=False))
        return model_needs(parse_slots(slots), stages, cuda=True)
    except (OmegaConfBaseException, ValueError, TypeError, AttributeError) as error:
        raise ToolError(f"{config}: {str(error).splitlines()[0]} (is it an animate124 config, with system.guidances "
                        "and system.stages?)") from error


def report(config: Path, needs: list) -> str:
    """The listing printed by the command."""
    from animate124.core.guidance.published_models import fetch_command, human_size

    lines = [f"{config}: {len(needs)} models, {human_size(sum(n.size for n in needs))} read by its stages (sizes as "
             f"published); Hugging Face cache {_hub_cache()} (looked up offline)"]
    for need in needs:
        lines.append("")
        if need.local:
            head = f"folder {need.name}"
        elif need.model:
            head = f"{need.name} ({need.model.title}), revision {need.revision}"
            if need.cached_as:
                head += f", cached as {need.cached_as} (the repository's other name)"
        else:
            head = need.name
        status = "all present" if not need.missing else f"{len(need.missing)} missing"
        if need.unknown:
            status = ("in the cache" if _unknown_cached(need) else "NOT in the cache") + (
                ", files not listed (not one of the published models in core/guidance/published_models.py); "
                f"`{_cli()} download {need.name}` fetches the whole repository")
        lines.append(f"{head}: {human_size(need.size)} in {len(need.files)} files, {status}")
        lines.append(f"  loaded by {', '.join(need.users)}")
        where = "here" if need.local else "cached"
        for f in need.files:
            lines.append(f"  {where if f.found else 'MISSING':8} {human_size(f.size):>8}  {f.path}")
    hub_missing = [n for n in needs if n.model and not n.local and n.missing]
    local_missing = [n for n in needs if n.local and n.missing]
    lines.append("")
    if hub_missing:
        size = human_size(sum(f.size for n in hub_missing for f in n.missing))
        count = sum(len(n.missing) for n in hub_missing)
        lines.append(f"missing: {size} in {count} files of {len(hub_missing)} models. Fetch them (where the network "
                     f"allows; then copy {_hub_cache()} to the GPU machine if it is another) with:")
        lines.append("  " + fetch_command(hub_missing).replace(" && ", " && \\\n  "))
        lines.append(f"or: animate124 models {config} --fetch")
    if local_missing:
        lines.append(f"{len(local_missing)} local folder(s) lack files (listed above): fix the path, or write them "
                     "with `animate124 make-tiny-models DIR` (tests) / download the repository into the folder")
    if not hub_missing and not local_missing:
        lines.append("every file is here: the run can start offline (HF_HUB_OFFLINE=1)")
    if os.environ.get("HF_HUB_CACHE") and _version("diffusers").startswith("0.19."):
        lines.append("note: diffusers 0.19 does not read HF_HUB_CACHE (it reads HF_HOME): set HF_HOME=FOLDER, whose "
                     "hub/ sub-folder is the cache, so the run looks where this listing looked")
    return "\n".join(lines)


def fetch(needs: list) -> None:
    """Download every missing file of the hub models into the Hugging Face cache (what the printed command does)."""
    from animate124.tools.cli import ToolError

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ToolError("HF_HUB_OFFLINE is set: unset it to download (or run the command above where the network "
                        "allows)")
    from huggingface_hub import hf_hub_download

    for need in needs:
        if not need.model or need.local:
            continue
        for f in need.missing:
            print(f"fetching {need.model.repo_id}/{f.path} ({f.size / 1e9:.2f} GB)", flush=True)
            try:
                hf_hub_download(need.model.repo_id, f.path, revision=need.revision)
            except Exception as error:  # noqa: BLE001 - no network, a gated repo, a renamed file: one line
                raise ToolError(f"could not download {need.model.repo_id}/{f.path} ({type(error).__name__}: "
                                f"{str(error).splitlines()[0][:200]}): run the printed command where the network "
                                "allows") from None


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def _cli() -> str:
    from animate124.core.guidance.published_models import hub_cli

    return hub_cli()


def _unknown_cached(need) -> bool:
    from animate124.core.guidance.published_models import cached_file

    return any(cached_file(need.name, name) for name in ("model_index.json", "config.json"))
