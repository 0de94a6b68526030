"""Under DDP, prove at the end of training that every rank holds the same model.

Gradients are averaged across ranks and the occupancy grid is updated with generators seeded by the step, so every
parameter and every occupancy buffer must be bit-identical on all ranks. This callback fingerprints them on each rank
when training ends, gathers the fingerprints, and rank 0 writes ``ddp_check.json`` beside ``stages.json``; a mismatch
is logged as an error with the tensors that differ. Nothing happens on a single process.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytorch_lightning as pl
import threestudio
import torch


def fingerprints(module: torch.nn.Module) -> dict[str, str]:
    """sha256 (16 hex digits) of every parameter and persistent buffer, by state_dict key."""
    out = {}
    for key, tensor in module.state_dict().items():
        if torch.is_tensor(tensor):
            data = tensor.detach().cpu().contiguous()
            out[key] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:16]
    return out


class DDPConsistencyCheck(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        mine = fingerprints(pl_module)
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, mine)
        if trainer.global_rank != 0:
            return
        differing = sorted(k for k in mine if len({g.get(k) for g in gathered}) > 1)
        report = {"world_size": trainer.world_size, "step": trainer.global_step, "tensors": len(mine),
                  "identical": not differing, "differing": differing,
                  "model_fingerprint": [hashlib.sha256(json.dumps(g, sort_keys=True).encode()).hexdigest()[:16]
                                        for g in gathered]}
        path = os.path.join(os.path.dirname(pl_module.get_save_dir()), "ddp_check.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        if differing:
            threestudio.warn(f"DDP: ranks differ in {len(differing)} tensors ({differing[:5]}...): see {path}")
        else:
            threestudio.info(f"DDP: all {trainer.world_size} ranks hold bit-identical weights ({len(mine)} tensors)")
