"""The peak replay of ``animate124 benchmark --profile``'s memory table, on synthetic allocator events (CPU), and on
the real CUDA allocator history when a GPU is present."""

import pytest
import torch

from step_benchmark.memory_peak import MemoryWindow, Roots, package_roots, peak_live
from step_benchmark.memory_peak import peak_table as _peak_table

MIB = 2**20
ROOTS = Roots(ours=(("/w/animate124", "/w"), ("/w/ts/threestudio", "/w/ts")),
              libraries=(("/py/site-packages/diffusers", "/py/site-packages"),),
              skipped=("/w/benchmarks/step_benchmark/floor.py",))


def peak_table(events, allocated_at_start):
    return _peak_table(events, allocated_at_start, roots=ROOTS)


def _alloc(addr, size, filename="/w/animate124/core/render/volrend.py", line=10, name="render_rays"):
    return {"action": "alloc", "addr": addr, "size": size,
            "frames": [{"filename": "/py/torch/autograd/function.py", "line": 1, "name": "apply"},
                       {"filename": "/py/site-packages/diffusers/models/resnet.py", "line": 5, "name": "forward"},
                       {"filename": filename, "line": line, "name": name}]}


def _free(addr, size):
    return {"action": "free_requested", "addr": addr, "size": size, "frames": []}


def test_peak_is_the_highest_point_and_lists_what_is_alive_then():
    events = [_alloc(1, 100 * MIB), _alloc(2, 300 * MIB, line=20), _free(1, 100 * MIB),
              _alloc(3, 50 * MIB, line=30), _free(2, 300 * MIB), _alloc(4, 200 * MIB, line=40)]
    rise, index, live, freed_before = peak_live(events)
    # heights: 100, 400, 300, 350, 50, 250 -> peak 400 MiB at event 2, alive: allocations 1 and 2
    assert rise == 400 * MIB and index == 1 and freed_before == 0
    assert sorted(e["addr"] for e in live) == [1, 2]


def test_memory_from_before_the_window_freed_before_the_peak_is_not_counted_twice():
    # 1 GiB allocated before the window; the window frees 256 MiB of it (address 9) and then reuses that address
    events = [_free(9, 256 * MIB), _alloc(9, 512 * MIB, line=11), _alloc(5, 128 * MIB, line=12)]
    rise, index, live, freed_before = peak_live(events)
    assert (rise, index, freed_before) == (384 * MIB, 2, 256 * MIB)
    table = peak_table(events, allocated_at_start=1024 * MIB)
    first = table.splitlines()[0]
    # peak = 1024 - 256 + 512 + 128 = 1408 MiB = 1.375 GiB; 0.75 GiB from before, 0.625 GiB made in the window
    assert first.startswith("peak allocated 1.375 GiB = 0.750 GiB allocated before") and "+ 0.625 GiB made" in first
    rows = table.splitlines()[2:]
    assert rows[0].split()[:2] == ["0.500", "1"] and "animate124/core/render/volrend.py:11 render_rays" in rows[0]
    assert "diffusers/models/resnet.py:5 forward" in rows[0]  # the innermost library frame
    assert rows[1].split()[:2] == ["0.125", "1"] and "volrend.py:12" in rows[1]


def test_the_benchmark_wrapper_frame_is_looked_past():
    event = _alloc(1, 64 * MIB, filename="/w/animate124/core/guidance/video_sds.py", line=222, name="_predict_noise")
    event["frames"].insert(2, {"filename": "/w/benchmarks/step_benchmark/floor.py", "line": 347, "name": "timed"})
    row = peak_table([event], allocated_at_start=0).splitlines()[2]
    assert "animate124/core/guidance/video_sds.py:222 _predict_noise" in row and "step_benchmark" not in row


def test_sites_are_matched_by_package_folder_not_by_a_name_in_the_path():
    """threestudio's README puts a venv inside its checkout, and ours puts this extension under threestudio/custom:
    a torch frame there is a library frame, not threestudio's; real files are shown from their package."""
    import os

    import animate124.core.guidance.sds as sds_module

    roots = package_roots()
    torch_file = os.path.join(os.path.dirname(torch.__file__), "nn", "functional.py")
    frames = [{"filename": "/home/u/threestudio/venv/lib/python3.11/site-packages/torch/_tensor.py", "line": 1,
               "name": "x"},
              {"filename": torch_file, "line": 2990, "name": "group_norm"},
              {"filename": "/home/u/threestudio/custom/threestudio-animate124/tests/x.py", "line": 3, "name": "t"},
              {"filename": sds_module.__file__, "line": 451, "name": "_moments"}]
    event = {"action": "alloc", "addr": 1, "size": 64 * MIB, "frames": frames}
    row = _peak_table([event], allocated_at_start=0, roots=roots).splitlines()[2]
    assert row.endswith("animate124/core/guidance/sds.py:451 _moments  |  torch/nn/functional.py:2990 group_norm"), row


def test_sites_group_allocations_and_frameless_ones_are_named_as_backward():
    events = [_alloc(1, 64 * MIB, line=7), _alloc(2, 64 * MIB, line=7),
              {"action": "alloc", "addr": 3, "size": 32 * MIB, "frames": []}]
    rows = peak_table(events, allocated_at_start=0).splitlines()[2:]
    assert rows[0].split()[:2] == ["0.125", "2"] and "volrend.py:7" in rows[0]
    assert "(no extension / threestudio frame)  |  (autograd backward, no Python frame)" in rows[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu tier: torch.cuda.is_available() is False")
def test_cuda_history_finds_the_line_that_made_the_peak():
    keep = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")  # before the window
    before = torch.cuda.memory_allocated()  # with whatever earlier tests of the process left alive
    window = MemoryWindow()
    window.start()
    big = _make_big()
    del big
    small = torch.empty(8 * MIB, dtype=torch.uint8, device="cuda")
    table = window.stop()
    del keep, small
    # (the table's sites come from package_roots(): this test file is neither the extension nor a library)
    rows = table.splitlines()
    gib = 2**30
    assert rows[0].startswith(f"peak allocated {(before + 256 * MIB) / gib:.3f} GiB = {before / gib:.3f} GiB "
                              "allocated before the window"), (table, before)
    # the 256 MiB block made by a test-file line (neither the extension nor a library) is the one live at the peak
    assert rows[2].split()[:2] == ["0.250", "1"], table
    assert rows[2].endswith("(no extension / threestudio frame)  |  -"), table
    assert len(rows) == 3, table


def _make_big():
    return torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
