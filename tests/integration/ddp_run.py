"""Train the a124-system under Lightning DDP on CPU (gloo), as threestudio's `--gpu 0,1` does on GPUs.

Run by tests/integration/test_ddp_integration.py: ``python ddp_run.py CONFIG.yaml OUT_DIR --devices 2``. Lightning's
DDP launcher re-runs this script once per extra rank, so every rank sets itself up exactly like rank 0 (threestudio
loaded through launch.py's loader, components on the CPU). Each rank writes OUT_DIR/rank{r}.json: a fingerprint of
every geometry parameter and of the occupancy grid, and the frame times / azimuths of the clips it trained on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fingerprint(tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()

    from threestudio_env import load_threestudio

    threestudio = load_threestudio()
    import pytorch_lightning as pl
    from threestudio.utils.config import load_config

    cfg = load_config(args.config, n_gpus=args.devices)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    pl.seed_everything(cfg.seed + rank)  # as launch.py: each rank draws its own clips and cameras
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system)
    system.set_save_dir(os.path.join(cfg.trial_dir, "save"))
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({"times": batch["video"]["frame_times"].tolist(), "azimuth": batch["video"]["azimuth"].tolist()})

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(cfg.trial_dir, "ckpts"), **cfg.checkpoint)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp", logger=False,
                         callbacks=[ckpt, Record()], inference_mode=False, **cfg.trainer)
    trainer.fit(system, datamodule=dm)
    state = {k: fingerprint(v) for k, v in system.geometry.state_dict().items()}
    state.update({f"renderer.{k}": fingerprint(v) for k, v in system.renderer.estimator.state_dict().items()})
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(args.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"rank": trainer.global_rank, "world_size": trainer.world_size, "state": state, "clips": seen,
                   "trial_dir": cfg.trial_dir, "global_step": trainer.global_step}, f)


if __name__ == "__main__":
    main()
