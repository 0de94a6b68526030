"""A Hugging Face cache holding local folders under hub ids, for tests and offline demonstrations.

``fill_hub_cache(cache_dir, repo_id, folder)`` lays ``folder``'s files out as ``huggingface_hub`` keeps a download
(``models--owner--name/refs/<revision>`` naming a snapshot, ``snapshots/<commit>/<files>``), so every loader
(``from_pretrained`` with ``HF_HUB_OFFLINE=1``, ``try_to_load_from_cache``) finds them under that id.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def fill_hub_cache(cache_dir: str | Path, repo_id: str, folder: str | Path, revision: str = "main") -> Path:
    """Copy ``folder`` into the cache at ``cache_dir`` as ``repo_id`` at ``revision``; returns the snapshot folder."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns(".complete"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
