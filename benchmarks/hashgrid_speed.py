"""Hash-grid encoding speed: torch reference vs Triton (vs tinycudann when installed), forward and forward+backward.

The upstream threestudio branch's grid: 16 levels x 2 features, 2**19 table, base 16, scale 1.4473, fp32,
2**21 random points in [0, 1]^D, D = 3 and 4. Times are medians over ``--repeats`` calls after ``--warmup`` calls,
measured with CUDA events; forward+backward includes the embeddings' gradient (dL/dout random). Only the ratios
within one run mean something across machines.

    python benchmarks/hashgrid_speed.py --out hashgrid_speed.json          # on a GPU
    python benchmarks/hashgrid_speed.py --sweep                            # also try Triton block/warp settings
    python benchmarks/hashgrid_speed.py                                    # no CUDA: torch only, 4096 points (smoke)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from animate124.core.field.hashgrid import HashGridEncoding  # noqa: E402

CONFIG = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
              per_level_scale=1.447269237440378)
SWEEP = [(128, 4), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 8)]  # (points per program, warps)


def main() -> None:
    args = _parse()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n = args.n or (2**21 if cuda else 4096)
    impls = _implementations(cuda, args.impls)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; {n} points; "
          f"median of {args.repeats} after {args.warmup} warm-up calls; implementations {impls}")
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "n_points": n,
               "config": CONFIG, "rows": []}
    for d in args.dims:
        gen = torch.Generator().manual_seed(d)
        enc = HashGridEncoding(d, **CONFIG, implementation="torch", generator=gen).to(device)
        x = torch.rand(n, d, generator=gen).to(device)
        grad_out = torch.randn(n, enc.n_output_dims, generator=gen).to(device)
        reference = _outputs(enc, "torch", x) if "torch" in impls else None
        for impl in impls:
            row = _measure(enc, impl, x, grad_out, args)
            row["dims"] = d
            if reference is not None and impl != "torch":
                row["max_abs_diff_vs_torch"] = (_outputs(enc, impl, x) - reference).abs().max().item()
            results["rows"].append(row)
        if args.sweep and "triton" in impls:
            results.setdefault("sweep", []).extend(_sweep(enc, x, grad_out, args, d))
        del enc, x, grad_out, reference
        if cuda:
            torch.cuda.empty_cache()
    _print_table(results["rows"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=0, help="points (default 2**21 on CUDA, 4096 on CPU)")
    parser.add_argument("--dims", type=int, nargs="+", default=[3, 4], help="input dimensions to time")
    parser.add_argument("--impls", nargs="+", default=None, help="subset of torch triton tcnn (default: available)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (median reported, >= 10 advised)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (Triton compiles here)")
    parser.add_argument("--sweep", action="store_true", help="time Triton (block, warps) settings too")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    return parser.parse_args()


def _implementations(cuda: bool, asked: list[str] | None) -> list[str]:
    available = ["torch"]
    if importlib.util.find_spec("triton") and (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        available.append("triton")
    spec = importlib.util.find_spec("tinycudann")
    if cuda and spec is not None and "host_stand_ins" not in str(spec.origin):
        available.append("tcnn")
    if asked is None:
        return available
    missing = [a for a in asked if a not in available]
    if missing:
        raise SystemExit(f"--impls {missing} not available here (available: {available})")
    return asked


def _outputs(enc: HashGridEncoding, impl: str, x: torch.Tensor) -> torch.Tensor:
    enc.implementation = impl
    with torch.no_grad():
        return enc(x)


def _measure(enc: HashGridEncoding, impl: str, x: torch.Tensor, grad_out: torch.Tensor, args) -> dict:
    enc.implementation = impl

    def forward():
        with torch.no_grad():
            enc(x)

    def forward_backward():
        enc.embeddings.grad = None
        enc(x).backward(grad_out)

    fwd = _time(forward, args.warmup, args.repeats)
    fwd_bwd = _time(forward_backward, args.warmup, args.repeats)
    return {"impl": impl, "forward_ms": fwd, "forward_backward_ms": fwd_bwd}


def _sweep(enc: HashGridEncoding, x: torch.Tensor, grad_out: torch.Tensor, args, d: int) -> list[dict]:
    from animate124.core.field import hashgrid_triton as ht

    rows = []
    for block, warps in SWEEP:
        config = ht.KernelConfig(block, warps, block, warps)

        def forward():
            with torch.no_grad():
                ht.hash_grid_encode_triton(x, enc.embeddings, enc.levels, enc.n_levels, enc._level_table, config)

        def forward_backward():
            enc.embeddings.grad = None
            out = ht.hash_grid_encode_triton(x, enc.embeddings, enc.levels, enc.n_levels, enc._level_table, config)
            out.backward(grad_out)

        fwd, fwd_bwd = _time(forward, args.warmup, args.repeats), _time(forward_backward, args.warmup, args.repeats)
        rows.append({"dims": d, "block": block, "warps": warps, "forward_ms": fwd, "forward_backward_ms": fwd_bwd})
        print(f"sweep D={d} block={block:5d} warps={warps}: forward {fwd:8.3f} ms, forward+backward {fwd_bwd:8.3f} ms"
              f" (backward alone ~{fwd_bwd - fwd:.3f} ms)")
    return rows


def _time(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _print_table(rows: list[dict]) -> None:
    base = {(r["dims"], "fwd"): r["forward_ms"] for r in rows if r["impl"] == "torch"}
    base.update({(r["dims"], "fb"): r["forward_backward_ms"] for r in rows if r["impl"] == "torch"})
    print(f"\n{'impl':8s} {'D':>2s} {'forward ms':>11s} {'fwd+bwd ms':>11s} {'fwd x':>7s} {'fwd+bwd x':>10s} "
          f"{'max|diff| vs torch':>19s}")
    for r in rows:
        fx = base.get((r["dims"], "fwd"), float("nan")) / r["forward_ms"]
        fbx = base.get((r["dims"], "fb"), float("nan")) / r["forward_backward_ms"]
        r["speedup_forward_vs_torch"], r["speedup_forward_backward_vs_torch"] = fx, fbx
        diff = r.get("max_abs_diff_vs_torch")
        print(f"{r['impl']:8s} {r['dims']:2d} {r['forward_ms']:11.3f} {r['forward_backward_ms']:11.3f} {fx:7.1f} "
              f"{fbx:10.1f} {'' if diff is None else f'{diff:.1e}':>19s}")
    print("(x = torch time / this time, same run; goal: Triton fwd+bwd >= 10x at 2**21 points on an H100)")


if __name__ == "__main__":
    main()
