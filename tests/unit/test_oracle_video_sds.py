"""Video SDS against an exact denoiser of a known target clip must raise PSNR to the target by >= 10 dB.

Small CPU version of benchmarks/oracle_video_sds.py (same code, fewer steps)."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "oracle_video_sds.py"


@pytest.fixture(scope="module")
def oracle():
    if not BENCH.is_file():  # pragma: no cover - the repo always has it
        pytest.fail(f"missing {BENCH}")
    spec = importlib.util.spec_from_file_location("oracle_video_sds", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exact_denoiser_makes_eps_difference_proportional_to_latent_error(oracle):
    """ε̂ − ε = √ᾱ (z − z*) / √(1 − ᾱ) for every noise draw (the property the oracle relies on)."""
    gen = torch.Generator().manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 1000)
    target, z = torch.randn(1, 4, 2, 3, 3, generator=gen), torch.randn(1, 4, 2, 3, 3, generator=gen)
    eps = torch.randn(1, 4, 2, 3, 3, generator=gen)
    t = torch.tensor([700])
    a = alphas[700]
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    eps_hat = oracle.ExactDenoiser(target, alphas)(torch.cat([z_t, z_t]), torch.cat([t, t])).sample
    expected = a.sqrt() * (z - target) / (1 - a).sqrt()
    torch.testing.assert_close(eps_hat[:1] - eps, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps_hat[1:] - eps, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "mode, vae, steps, size",
    [("latents", "tiny", 60, 32), ("frames", "linear", 80, 32), ("field", "linear", 250, 64)],
)
def test_video_sds_alone_raises_psnr_by_10_db(oracle, tiny_models, mode, vae, steps, size):
    r = oracle.run_oracle(tiny_models["text-to-video"], mode, vae, steps=steps, frames=3, size=size)
    gain = r["psnr_after"] - r["psnr_before"]
    assert gain >= 10.0, r
