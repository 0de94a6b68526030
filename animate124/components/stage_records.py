"""Per-stage wall time, median step time and peak VRAM, written to ``<trial>/stages.json`` and to the loggers; the
test and export passes' wall time and peak VRAM next to them; the results page after each.

A Lightning callback that the ``a124-system`` returns from ``configure_callbacks()``. It watches the stage index the
system is in before each batch; a record closes when the stage changes and at the end of
training. Its state (closed records and the stage in progress) travels in the checkpoint, so a run resumed inside a
stage keeps that stage's record whole (counted from the stage's start, with the time already spent).

``stages.json`` holds ``stages`` (one record per stage), ``total_steps``, ``stage_starts`` and, once they ran,
``test`` and ``export`` ({wall_time_s, batches, peak_vram_gb, step}); each write keeps the keys it does not own, so a
later ``--test`` or ``--export`` process adds to the training run's file. After training, testing and exporting,
``report.html`` is (re)written into the trial folder (``animate124.core.report.page``); a failure there is logged,
never raised. Written by global rank 0 only.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Optional

import pytorch_lightning as pl
import threestudio
import torch

from animate124.core.io.atomic_io import write_json
from animate124.core.report.page import write_report
from animate124.core.training.stages import stage_at, stage_starts, total_steps


class StageRecords(pl.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []
        self._open: Optional[dict] = None  # {"stage", "index", "start_step", "t0"}
        self._resumed: Optional[dict] = None
        self._step_t0: Optional[float] = None
        self._pass: Optional[dict] = None  # the test / export pass in progress: {"t0", "batches"}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_t0 = time.perf_counter()
        index, stage, _, _ = stage_at(pl_module.stages, pl_module.true_global_step)
        if self._open is not None and self._open["index"] == index:
            return
        self._close(trainer, pl_module)
        step = pl_module.true_global_step
        self._open = {"stage": stage.name, "index": index, "start_step": step, "t0": time.time(), "step_s": []}
        resumed, self._resumed = self._resumed, None
        if resumed is not None and resumed["stage"] == stage.name:  # resumed inside this stage: keep its record whole
            self._open.update(start_step=resumed["start_step"], t0=time.time() - resumed["elapsed_s"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # whole step: forward, backward, optimizer, bookkeeping (the stage's first step also loads its guidances)
        if self._open is not None and self._step_t0 is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._open["step_s"].append(time.perf_counter() - self._step_t0)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer, pl_module)
        if trainer.global_rank == 0:
            for logger in trainer.loggers:  # the CSV logger buffers rows: the page reads the file
                logger.save()
            self._report(pl_module)

    # test (trainer.test) and export (trainer.predict) passes

    def on_test_start(self, trainer, pl_module) -> None:
        self._start_pass()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._pass is not None:
            self._pass["batches"] += 1

    def on_test_end(self, trainer, pl_module) -> None:  # after on_test_epoch_end has written the videos
        self._end_pass(trainer, pl_module, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start_pass()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._pass is not None:
            self._pass["batches"] += 1

    def on_predict_end(self, trainer, pl_module) -> None:  # after on_predict_epoch_end has exported
        self._end_pass(trainer, pl_module, "export")

    def _start_pass(self) -> None:
        self._pass = {"t0": time.time(), "batches": 0}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _end_pass(self, trainer, pl_module, name: str) -> None:
        clock, self._pass = self._pass, None
        if clock is None or trainer.global_rank != 0:
            return
        record = {"wall_time_s": round(time.time() - clock["t0"], 3), "batches": clock["batches"],
                  "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)
                  if torch.cuda.is_available() else None, "step": pl_module.true_global_step}
        self._update_file(pl_module, {name: record})
        self._report(pl_module)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"records": list(self.records)}
        if self._open is not None:
            state["open"] = {"stage": self._open["stage"], "start_step": self._open["start_step"],
                             "elapsed_s": time.time() - self._open["t0"]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict.get("records", []))
        self._resumed = state_dict.get("open")

    def _close(self, trainer, pl_module) -> None:
        if self._open is None:
            return
        clock, self._open = self._open, None
        step = pl_module.true_global_step
        record = {
            "stage": clock["stage"],
            "start_step": clock["start_step"],
            "end_step": step,
            "steps": step - clock["start_step"],
            "wall_time_s": round(time.time() - clock["t0"], 3),
            # median over the steps this process ran in the stage, its first (guidance loading) left out
            "median_step_s": round(statistics.median(clock["step_s"][1:] or clock["step_s"]), 4)
            if clock.get("step_s") else None,
            "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        }
        self.records.append(record)
        if trainer.global_rank != 0:
            return
        metrics = {f"stages/{record['stage']}_wall_time_s": record["wall_time_s"]}
        if record["peak_vram_gb"] is not None:
            metrics[f"stages/{record['stage']}_peak_vram_gb"] = record["peak_vram_gb"]
        for logger in trainer.loggers:  # self.log is not allowed in on_train_end: write to the loggers directly
            logger.log_metrics(metrics, step=step)
        self._update_file(pl_module, {"stages": self.records, "total_steps": total_steps(pl_module.stages),
                                      "stage_starts": stage_starts(pl_module.stages)})

    @staticmethod
    def _trial_dir(pl_module) -> Optional[str]:
        return None if pl_module._save_dir is None else os.path.dirname(pl_module.get_save_dir())

    def _update_file(self, pl_module, entries: dict) -> None:
        """Set ``entries`` in ``<trial>/stages.json``, keeping the keys already there that they do not replace."""
        trial = self._trial_dir(pl_module)
        if trial is None:
            return
        path = os.path.join(trial, "stages.json")
        content = {}
        try:
            with open(path) as f:
                content = json.load(f)
        except (OSError, ValueError):
            pass  # no file yet (or an unreadable one, replaced whole)
        write_json(path, {**content, **entries}, indent=2)

    def _report(self, pl_module) -> None:
        trial = self._trial_dir(pl_module)
        if trial is None:
            return
        try:
            path = write_report(trial)
        except Exception as error:  # noqa: BLE001  (the results page must never fail a finished run)
            threestudio.warn(f"report.html not written: {type(error).__name__}: {error}")
            return
        threestudio.info(f"results page: {path}")
