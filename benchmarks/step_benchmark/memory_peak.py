"""What holds GPU memory at a window's peak: the live allocations there, grouped by the code that made them.

``MemoryWindow`` records the CUDA caching allocator's history (``torch.cuda.memory._record_memory_history``, Python
stacks only) from ``start()`` to ``stop()``; ``peak_table`` replays the allocation events, finds the moment the
allocated bytes were highest and sums the allocations alive then by their site: the innermost frame in this
extension or threestudio, and the innermost frame in a model library (diffusers, transformers, ...). Memory allocated
before the window and still alive at its peak (models, optimiser state, earlier steps' caches) is one line. Used by
``animate124 benchmark --profile`` to find what a stage's peak is made of; the replay itself is plain Python and is
tested on synthetic events on the CPU.

The events carry the sizes asked for, while ``torch.cuda.memory_allocated`` counts the allocator's rounded blocks, so
the peak here can read slightly below ``max_memory_allocated``. ``stop()`` turns the allocator's history off, ending
any recording of your own.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import defaultdict
from typing import NamedTuple


class Roots(NamedTuple):
    """Folders (or files) whose frames name a site, each with the folder its paths are shown from: ``ours`` (this
    extension, threestudio) and ``libraries``; and ``skipped``: files looked past (the benchmark's own wrappers)."""

    ours: tuple[tuple[str, str], ...]
    libraries: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...] = ()


def package_roots() -> Roots:
    """The installed packages' own folders, found by import spec. Matching paths by a package *name* would take
    ``threestudio/venv/.../torch/...`` or ``threestudio/custom/...`` for threestudio's own code."""

    def where(package: str, *sub: str) -> tuple[str, str] | None:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = list(spec.submodule_search_locations)[0]
        return os.path.join(folder, *sub), os.path.dirname(folder)

    ours = tuple(r for r in (where("animate124"), where("threestudio")) if r)
    libraries = tuple(r for r in (where("diffusers"), where("transformers"), where("nerfacc"),
                                  where("pytorch_lightning"), where("lightning"), where("torch", "nn"),
                                  where("torch", "utils", "checkpoint.py")) if r)
    return Roots(ours, libraries)


@functools.lru_cache(maxsize=None)  # the same files and roots come back for every frame of every allocation
def _norm(path: str) -> str:
    return os.path.normpath(os.path.realpath(path)) if os.path.exists(path) else os.path.normpath(path)


def _site(frames: list[dict], roots: tuple[tuple[str, str], ...], skipped: tuple[str, ...] = ()) -> str | None:
    """``path:line function`` of the innermost frame (the allocator lists them innermost first) whose file is under
    one of ``roots``, the path shown from the root's base (``animate124/core/guidance/sds.py``)."""
    for frame in frames:
        filename = _norm(frame.get("filename", ""))
        if any(filename == _norm(path) for path in skipped):
            continue
        for root, base in roots:
            root = _norm(root)
            if filename == root or filename.startswith(root + os.sep):
                short = os.path.relpath(filename, _norm(base)).replace(os.sep, "/")
                return f"{short}:{frame.get('line')} {frame.get('name')}"
    return None


def peak_live(events: list[dict]) -> tuple[int, int, list[dict], int]:
    """Replay ``alloc`` / ``free_requested`` events: bytes at the peak relative to the window's start, the index of
    the event that reached it, the allocations made in the window and alive then, and the bytes allocated before the
    window and freed before the peak."""
    current = best = 0
    best_index = -1
    for index, event in enumerate(events):
        action = event.get("action")
        if action == "alloc":
            current += event["size"]
            if current > best:
                best, best_index = current, index
        elif action == "free_requested":
            current -= event["size"]
    live: dict[int, dict] = {}
    freed_from_before = 0
    for event in events[: best_index + 1]:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
        elif action == "free_requested":
            if live.pop(event["addr"], None) is None:  # not made in the window: made before it
                freed_from_before += event["size"]
    return best, best_index, list(live.values()), freed_from_before


def peak_table(events: list[dict], allocated_at_start: int, *, rows: int = 25, roots: Roots | None = None) -> str:
    """Text table of the peak: total, what was allocated before the window and is still alive, and the window's live
    allocations by site (largest first). ``roots``: where the sites' files live (default: ``package_roots()``)."""
    roots = roots or package_roots()
    gib = 1024**3
    rise, index, live, freed_from_before = peak_live(events)
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for event in live:
        frames = event.get("frames") or []
        ours = _site(frames, roots.ours, roots.skipped) or "(no extension / threestudio frame)"
        library = _site(frames, roots.libraries) or ("(autograd backward, no Python frame)" if not frames else "-")
        groups[(ours, library)][0] += event["size"]
        groups[(ours, library)][1] += 1
    peak = allocated_at_start + rise
    before = allocated_at_start - freed_from_before
    lines = [f"peak allocated {peak / gib:.3f} GiB = {before / gib:.3f} GiB allocated before the window and alive "
             f"at its peak + {sum(e['size'] for e in live) / gib:.3f} GiB made in it, live at the peak "
             f"(event {index + 1} of {len(events)})",
             f"{'GiB':>8} {'count':>6}  extension / threestudio frame  |  library frame"]
    for (ours, library), (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{size / gib:8.3f} {count:6d}  {ours}  |  {library}")
    if len(groups) > rows:
        rest = sorted(groups.values(), key=lambda v: -v[0])[rows:]
        lines.append(f"{sum(v[0] for v in rest) / gib:8.3f} {sum(v[1] for v in rest):6d}  ({len(rest)} more sites)")
    return "\n".join(lines)


class MemoryWindow:
    """Allocation history of the current CUDA device between ``start()`` and ``stop()`` (no-op without CUDA)."""

    def __init__(self, max_entries: int = 2_000_000):
        self.max_entries = max_entries
        self.allocated_at_start = None

    def start(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        torch.cuda.synchronize()
        self.allocated_at_start = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=self.max_entries)

    def stop(self) -> str | None:
        import torch

        if self.allocated_at_start is None:
            return None
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        events = snapshot["device_traces"][torch.cuda.current_device()]
        start, self.allocated_at_start = self.allocated_at_start, None
        if len(events) >= self.max_entries:
            return f"memory: the window made over {self.max_entries} allocator events; its peak is not known"
        return peak_table(events, start)
