"""Timing whole training steps inside Lightning's fit: warm-up, timed steps, the floor replayed after them, optional
profiles, and a clean stop on SIGTERM that keeps the stages already measured."""

from __future__ import annotations

import gc
import signal
import statistics
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from animate124.core.field.work_counters import WorkCounts
from animate124.core.training.stages import stage_at
from step_benchmark import NOTE
from step_benchmark.floor import CallRecorder, compiled_graphs
from step_benchmark.work import LaunchCount, stage_work


class Profiles:
    """Profiled windows written one after another to a text file: per window the operators by self device and by self
    CPU time (torch.profiler) and the Python functions by cumulative time (cProfile), to find what a step spends
    beyond its floor. On CUDA, apart from those windows (recording every allocation's Python stack would inflate their
    CPU times), the memory live at a window's peak by the code that allocated it (``memory_peak``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"animate124 benchmark --profile ({NOTE})\n")
        self.current = None
        self.memory = None

    def start(self) -> None:
        import cProfile

        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.current = (profile(activities=activities), cProfile.Profile())
        self.current[0].__enter__()
        self.current[1].enable()

    def stop(self, title: str) -> None:
        import torch

        if self.current is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        import io
        import pstats

        (prof, python), self.current = self.current, None
        python.disable()
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        stream = io.StringIO()
        pstats.Stats(python, stream=stream).sort_stats("cumulative").print_stats(
            r"animate124|threestudio|lightning|diffusers|torch/(optim|nn/functional)", 40)
        cuda_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        self._write([f"\n===== {title} =====", "-- operators by self device time",
                     events.table(sort_by=cuda_key, row_limit=25),
                     "-- operators by self CPU time", events.table(sort_by="self_cpu_time_total", row_limit=25),
                     "-- Python functions by cumulative time (cProfile)", stream.getvalue().split("\n", 4)[-1]])

    def start_memory(self) -> None:
        from step_benchmark.memory_peak import MemoryWindow

        self.memory = MemoryWindow()
        self.memory.start()

    def stop_memory(self, title: str) -> None:
        if self.memory is None:
            return
        table, self.memory = self.memory.stop(), None
        if table is not None:  # None without CUDA
            self._write([f"\n===== {title} =====", "-- memory at the window's peak, by allocating code", table])

    def _write(self, parts: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write("\n".join(parts) + "\n")


class StepTimer(pl.Callback):
    """A Lightning callback timing every step of the shortened run: warm-up, timed and trailing steps per stage, the
    floor replayed at each trailing step, the work counters of every step (``work``) and the kernel launches of each
    trailing step (``launches``)."""

    def __init__(self, recorder: CallRecorder, system, *, warmup: int, steps: int, replays: int, profiler=None):
        super().__init__()
        self.recorder, self.system, self.profiler = recorder, system, profiler
        self.warmup, self.steps, self.replays = warmup, steps, replays
        self.launches: dict[str, dict] = {}  # stage -> kernel launches of its trailing step
        self._counts = None  # the step's WorkCounts
        self._launch_count = None  # the trailing step's LaunchCount
        self.records: list[dict] = []
        self.floors: dict[str, dict] = {}  # stage -> {key: (ms, what)}
        self.stage_memory: dict[str, dict] = {}
        self.load_s: dict[str, float] = {}
        self.current = None
        self.first_step_start = None
        self._wrap_system()

    def _wrap_system(self):
        self.recorder.wrap(self.system.renderer, "forward", "render")
        slots = self.system.guidance_slots
        keep_only = slots.keep_only

        def timed_keep_only(names, *args, **kwargs):
            before = set(slots.guidances)
            self.recorder.sync()
            t0 = time.perf_counter()
            keep_only(names, *args, **kwargs)
            self.recorder.sync()
            new = [n for n in slots.guidances if n not in before]
            for name in new:  # the loads of one stage start, shared between its new slots
                self.load_s[name] = (time.perf_counter() - t0) / len(new)
                self.recorder.attach_slot(name, slots.guidances.get(name), slots.prompt_processors.get(name))

        slots.keep_only = timed_keep_only

    def _role(self, step: int):
        pos = stage_at(self.system.stages, step)
        offset = step - sum(s.steps for s in self.system.stages[: pos.index])
        role = "warmup" if offset < self.warmup else "measure" if offset < self.warmup + self.steps else "trailing"
        return pos.stage.name, role, offset

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.recorder.sync()
        now = self.recorder.clock()
        step = pl_module.true_global_step
        name, role, offset = self._role(step)
        if self.profiler is not None and offset == self.warmup:  # the profiled warm-up steps of this stage are over
            self.profiler.stop(f"stage {name}: warm-up steps 1..{self.warmup - 1} (after its first)")
            self.recorder.sync()
            now = self.recorder.clock()
        self._close(now)
        if self.first_step_start is None:
            self.first_step_start = time.perf_counter()
        if role == "trailing":  # the stage's timed window is over: its floor, while its networks are loaded
            self.floors[name] = self.recorder.replay(self.replays)
            if self.profiler is not None:  # and what its memory peak is made of, in this untimed step
                self.profiler.start_memory()
        self.recorder.active = role == "measure"
        self.recorder.pending = []
        if self.profiler is not None and offset == 1 and self.warmup >= 2:
            self.profiler.start()
        if role == "trailing":  # kernel launches of one whole step, untimed (the profiler costs time)
            self._launch_count = LaunchCount(self.system.device)
            self._launch_count.start()
        self._counts = WorkCounts().__enter__()
        self.current = {"step": step, "stage": name, "role": role, "offset": offset, "t0": now,
                        "fwd0": self.recorder.mark(), "fwd1": None, "bwd1": None, "finite": None,
                        "graphs0": compiled_graphs()}

    def on_before_backward(self, trainer, pl_module, loss):
        self.current["fwd1"] = self.recorder.mark()
        self.current["finite"] = torch.isfinite(loss.detach()).all()

    def on_after_backward(self, trainer, pl_module):
        self.current["bwd1"] = self.recorder.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.recorder.sync()
        cur = self.current
        if self._counts is not None:
            self._counts.__exit__(None, None, None)
            cur["work"], self._counts = dict(self._counts.counts), None
        if self._launch_count is not None:
            self.launches[cur["stage"]], self._launch_count = self._launch_count.stop(), None
        if self.profiler is not None and cur["role"] == "trailing":
            self.profiler.stop_memory(f"stage {cur['stage']}: its trailing step (after the timed ones)")
        cur["end"] = self.recorder.clock()
        cur["categories"] = {c: 0.0 for c in ("render", "encode", "unets")}
        cur["floor_keys"] = []
        for category, key, start, end in self.recorder.pending:
            cur["categories"][category] += self.recorder.elapsed_ms(start, end)
            if key is not None:
                cur["floor_keys"].append(key)
        self.recorder.pending = []
        if cur["fwd1"] is not None and cur["bwd1"] is not None:
            cur["forward_ms"] = self.recorder.elapsed_ms(cur["fwd0"], cur["fwd1"])
            cur["backward_ms"] = self.recorder.elapsed_ms(cur["fwd1"], cur["bwd1"])
        cur["finite"] = bool(cur["finite"]) if cur["finite"] is not None else True
        cur["compiles"] = compiled_graphs() - cur.pop("graphs0")  # graphs compiled / recorded in this step
        for k in ("fwd0", "fwd1", "bwd1"):
            cur.pop(k)
        memory = self.stage_memory.setdefault(cur["stage"], {})
        if cur["offset"] == 0:
            gc.collect()
            memory["stale_guidances"] = sorted(
                slot for slot, refs in self.recorder.modules.items()
                if slot not in self.system.guidance_slots.guidances and any(r() is not None for r in refs)
            )
            memory["guidances"] = sorted(self.system.guidance_slots.guidances)
            memory["resident_gb"] = _gb(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
        if cur["role"] == "measure" and cur["offset"] == self.warmup + self.steps - 1 and torch.cuda.is_available():
            memory["peak_allocated_gb"] = _gb(torch.cuda.max_memory_allocated())
            memory["peak_reserved_gb"] = _gb(torch.cuda.max_memory_reserved())

    def on_train_end(self, trainer, pl_module):
        self._close(self.current["end"] if self.current else self.recorder.clock())
        self.recorder.active = False
        self._stop_counting()

    def on_exception(self, trainer, pl_module, exception):
        self._stop_counting()

    def _stop_counting(self):
        if self._counts is not None:
            self._counts.__exit__(None, None, None)
            self._counts = None
        if self._launch_count is not None:
            self._launch_count.stop()
            self._launch_count = None

    def _close(self, now):
        if self.current is not None:
            self.current["wall_ms"] = (now - self.current.pop("t0")) * 1000
            self.current.pop("end", None)
            self.records.append(self.current)
            self.current = None

    def stage_results(self, full_steps: list[int]) -> list[dict]:
        out = []
        for index, stage in enumerate(self.system.stages):
            rows = [r for r in self.records if r["stage"] == stage.name]
            timed = [r for r in rows if r["role"] == "measure"]
            if not timed or stage.name not in self.floors:
                out.append({"name": stage.name, "steps_in_config": full_steps[index],
                            "error": "not measured (training stopped before this stage's timed steps ended)"})
                continue
            floors = self.floors.get(stage.name, {})
            # a step that compiled (a network first called in it, or a new shape) is a one-time cost: out of the
            # step statistics (unless every timed step compiled) and into switch_s below, as the first step is
            timed = [r for r in timed if not r.get("compiles")] or timed
            step_ms = [r["wall_ms"] for r in timed]
            floor_ms = [sum(floors[k][0] for k in r["floor_keys"] if k in floors) for r in timed]
            mean_step, mean_floor = statistics.mean(step_ms), statistics.mean(floor_ms)
            breakdown = {c: statistics.mean(r["categories"][c] for r in timed) for c in ("render", "encode", "unets")}
            breakdown["backward"] = statistics.mean(r.get("backward_ms", 0.0) for r in timed)
            breakdown["rest"] = mean_step - sum(breakdown.values())
            calls = {}
            for r in timed:
                for k in r["floor_keys"]:
                    if k in floors:
                        ms, what = floors[k]
                        calls.setdefault(what, {"what": what, "ms": round(ms, 3), "calls_per_step": 0})
                        calls[what]["calls_per_step"] += 1 / len(timed)
            memory = self.stage_memory.get(stage.name, {})
            first = rows[0]["wall_ms"] if rows else 0.0
            late_compiles = sum(max(r["wall_ms"] - mean_step, 0.0) for r in rows[1:] if r.get("compiles"))
            out.append({
                "name": stage.name,
                "steps_in_config": full_steps[index],
                "guidances": list(stage.guidances),
                "step_ms": _stats(step_ms),
                "floor_ms": _stats(floor_ms),
                "ratio": round(statistics.median(step_ms) / max(statistics.median(floor_ms), 1e-9), 3),
                "ratio_mean": round(mean_step / max(mean_floor, 1e-9), 3),
                "breakdown_ms": {k: round(v, 3) for k, v in breakdown.items()},
                "floor_calls": [dict(c, calls_per_step=round(c["calls_per_step"], 3)) for c in calls.values()],
                "first_step_ms": round(first, 3),
                "switch_s": round((max(first - mean_step, 0.0) + late_compiles) / 1000, 3),
                "compile_steps": [r["offset"] for r in rows if r.get("compiles")],
                "nonfinite_steps": sum(not r["finite"] for r in rows),
                "peak_allocated_gb": memory.get("peak_allocated_gb"),
                "peak_reserved_gb": memory.get("peak_reserved_gb"),
                "resident_gb": memory.get("resident_gb"),
                "loaded_guidances": memory.get("guidances", []),
                "stale_guidances": memory.get("stale_guidances", []),
                "work": stage_work([r.get("work", {}) for r in timed]),
                "launches": self.launches.get(stage.name),
            })
        return out


class BenchmarkStopped(Exception):
    """SIGTERM during training (e.g. from ``timeout``): raised inside the training loop so that Lightning tears down
    and the stages already measured are kept, instead of the process dying with nothing written."""


class StopOnSigterm:
    """Context manager: SIGTERM raises :class:`BenchmarkStopped` (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None

    def _raise(self, signum, frame) -> None:
        self.signalled = True
        raise BenchmarkStopped(f"stopped by {signal.Signals(signum).name}")

    def __enter__(self) -> "StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "mean": round(statistics.mean(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3), "all": [round(v, 3) for v in values]}


def _gb(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)
