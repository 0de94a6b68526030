"""Atomic writes: a crash mid-write leaves the old file intact and no partial file under the final name."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from animate124.core.io import atomic_io


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_whole_file_and_keeps_mode(tmp_path):
    path = tmp_path / "stages.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_io.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert path.stat().st_mode & 0o777 == 0o640
    assert _files(tmp_path) == ["stages.json"]
    atomic_io.write_text(tmp_path / "new" / "x.txt", "made with its folder")
    assert (tmp_path / "new" / "x.txt").read_text() == "made with its folder"


def test_exception_mid_write_keeps_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("the old report")
    with pytest.raises(OSError, match="disk full"):
        with atomic_io.atomic_open(path, "w") as f:
            f.write("half of the new rep")
            raise OSError(28, "disk full")
    assert path.read_text() == "the old report"
    assert _files(tmp_path) == ["report.md"]

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        atomic_io.save_with(tmp_path / "rgba.png", half_then_fail)
    assert _files(tmp_path) == ["report.md"]  # no rgba.png, complete or partial


def test_killed_process_leaves_old_file_intact(tmp_path):
    """A process killed mid-write (os._exit: no cleanup runs) leaves the old file untouched."""
    path = tmp_path / "mesh.glb"
    path.write_bytes(b"old mesh")
    code = ("import os, sys; from animate124.core.io import atomic_io\n"
            "with atomic_io.atomic_open(sys.argv[1], 'wb') as f:\n"
            "    f.write(b'new mesh, first half'); f.flush(); os._exit(9)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code, str(path)], env=env)
    assert result.returncode == 9
    assert path.read_bytes() == b"old mesh"
    leftovers = [n for n in _files(tmp_path) if n != "mesh.glb"]
    assert all(n.startswith(".mesh.glb.") and ".tmp" in n for n in leftovers), leftovers  # hidden temp, never the name


def test_write_sites_are_atomic(tmp_path, monkeypatch):
    """The embedding (invert) and the mesh sequence go through atomic_io: a failing writer keeps the old files."""
    from animate124.core.export.mesh_export import Mesh
    from animate124.core.export.writers import write_mesh_sequence
    from animate124.core.guidance.textual_inversion import save_learned_embeds

    paths = save_learned_embeds(tmp_path, "_tok_", torch.ones(4))
    old = {p: p.read_bytes() for p in paths}

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_learned_embeds(tmp_path, "_tok_", torch.zeros(4))
    assert paths[1].read_bytes() == old[paths[1]]
    assert not [n for n in _files(tmp_path) if n.startswith(".")]
    monkeypatch.undo()

    import trimesh

    mesh = Mesh(vertices=torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), faces=torch.tensor([[0, 1, 2]]),
                vertex_colors=None, time=0.0, threshold=0.0, voxel_size=0.1)
    out = tmp_path / "meshes"
    (written,) = write_mesh_sequence(out, [mesh])
    before = open(written, "rb").read()
    monkeypatch.setattr(trimesh.Trimesh, "export", lambda self, p: (open(p, "w").write("v 0 0"), crash()))
    with pytest.raises(OSError):
        write_mesh_sequence(out, [mesh])
    assert open(written, "rb").read() == before
    assert _files(out) == [os.path.basename(written)]


def test_only_write_modes():
    with pytest.raises(ValueError, match="must start with 'w'"):
        with atomic_io.atomic_open("x", "a"):
            pass
