"""Hash-grid encoding on CUDA: compiled Triton kernels vs the torch reference (values and embedding gradients)."""

import importlib.util

import pytest
import torch

from animate124.core.field.hashgrid import HashGridEncoding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu tier: torch.cuda.is_available() is False"),
]
N_POINTS = 2**16


def _run(enc: HashGridEncoding, impl: str, x: torch.Tensor, grad_out: torch.Tensor):
    enc.implementation = impl
    enc.embeddings.grad = None
    out = enc(x)
    (out * grad_out).sum().backward()
    return out.detach(), enc.embeddings.grad.clone()


def test_triton_point_gradient_matches_torch_on_cuda():
    gen = torch.Generator().manual_seed(5)
    for d in (3, 4):
        enc = HashGridEncoding(d, implementation="torch", init_scale=1.0, generator=gen).cuda()
        x = torch.rand(N_POINTS, d, generator=gen).cuda().requires_grad_(True)
        grad_out = torch.randn(N_POINTS, 32, generator=gen).cuda()
        grads = {}
        for impl in ("torch", "triton"):
            enc.implementation = impl
            grads[impl] = torch.autograd.grad(enc(x), [x, enc.embeddings], grad_out)
        for ref, tri in zip(grads["torch"], grads["triton"]):
            scale = ref.abs().max()  # x gradients carry the finest resolution (~4096): compare relative to the max
            print(f"D={d}: max |diff| {(tri - ref).abs().max().item():.2e} of max {scale.item():.2e}")
            torch.testing.assert_close(tri / scale, ref / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d", [3, 4])
@pytest.mark.parametrize("n_active", [16, 11])
def test_triton_matches_torch_on_cuda(d, n_active):
    # threestudio's default grid (16 levels x 2 features, 2**19 table, base 16, scale 1.4473): dense and hashed levels.
    gen = torch.Generator().manual_seed(d)
    enc = HashGridEncoding(d, implementation="torch", init_scale=1.0, generator=gen).cuda()
    assert True in enc.levels.dense and False in enc.levels.dense
    enc.n_active_levels = n_active
    x = torch.cat([torch.rand(N_POINTS - 2, d, generator=gen), torch.zeros(1, d), torch.ones(1, d)]).cuda()
    grad_out = torch.randn(N_POINTS, 32, generator=gen).cuda()
    out_ref, grad_ref = _run(enc, "torch", x, grad_out)
    out_tri, grad_tri = _run(enc, "triton", x, grad_out)
    print(f"D={d} active={n_active}: max |value diff| {(out_tri - out_ref).abs().max().item():.2e}, "
          f"max |grad diff| {(grad_tri - grad_ref).abs().max().item():.2e} (max |grad| {grad_ref.abs().max():.1f})")
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_tri, grad_ref, rtol=1e-4, atol=1e-4)  # atomic adds: order differs
    if n_active < 16:
        assert out_tri[:, 2 * n_active:].abs().max() == 0
        assert grad_tri[enc.level_offsets[n_active]:].abs().max() == 0
    out_auto, _ = _run(enc, "auto", x, grad_out)
    assert torch.equal(out_auto, out_tri)  # "auto" takes Triton on CUDA; its forward is deterministic


def test_triton_handles_odd_sizes_and_leading_dims():
    gen = torch.Generator().manual_seed(0)
    enc = HashGridEncoding(3, n_levels=8, log2_hashmap_size=14, implementation="triton", init_scale=1.0,
                           generator=gen).cuda()
    x = torch.rand(3, 333, 3, generator=gen).cuda()
    out = enc(x)
    enc.implementation = "torch"
    torch.testing.assert_close(out, enc(x), rtol=1e-5, atol=1e-5)
    assert out.shape == (3, 333, 16)
    enc.implementation = "triton"
    assert enc(x[:0]).shape == (0, 333, 16)


def test_tcnn_matches_torch_when_installed():
    spec = importlib.util.find_spec("tinycudann")
    if spec is None or "host_stand_ins" in str(spec.origin):
        pytest.skip("tinycudann is not installed (only the test stand-in, if any)")
    gen = torch.Generator().manual_seed(3)
    enc = HashGridEncoding(3, implementation="torch", init_scale=1.0, generator=gen).cuda()
    x = torch.rand(N_POINTS, 3, generator=gen).cuda()
    grad_out = torch.randn(N_POINTS, 32, generator=gen).cuda()
    out_ref, grad_ref = _run(enc, "torch", x, grad_out)
    out_tcnn, grad_tcnn = _run(enc, "tcnn", x, grad_out)
    torch.testing.assert_close(out_tcnn, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_tcnn, grad_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("d", [3, 4])
def test_backward_variants_agree_on_ray_ordered_samples(d):
    """Run merging changes only the order of the float additions: on samples packed ray after ray (runs of equal rows
    on the coarse levels) and on shuffled ones, every threshold gives the torch reference's embedding gradient."""
    from animate124.core.field import hashgrid_triton as ht

    gen = torch.Generator().manual_seed(20 + d)
    enc = HashGridEncoding(d, implementation="torch", init_scale=1.0, generator=gen).cuda()
    steps = torch.arange(200).view(1, -1, 1) * 0.003
    start = torch.rand(300, 1, d, generator=gen) * 0.4 + 0.1
    direction = torch.nn.functional.normalize(torch.randn(300, 1, d, generator=gen), dim=-1)
    rays = (start + direction * steps).reshape(-1, d).clamp(0, 1)
    grad_out = torch.randn(rays.shape[0], 32, generator=gen).cuda()
    for x in (rays.cuda(), rays[torch.randperm(rays.shape[0], generator=gen)].cuda()):
        _, ref = _run(enc, "torch", x, grad_out)
        for config in (ht.KernelConfig(merge_runs_max_res=0), ht.KernelConfig(merge_runs_max_res=64),
                       ht.KernelConfig(), ht.KernelConfig(merge_runs_max_res=1 << 20)):
            emb = enc.embeddings.detach().requires_grad_(True)
            out = ht.hash_grid_encode_triton(x, emb, enc.levels, enc.n_levels, config=config)
            (grad,) = torch.autograd.grad(out, emb, grad_out)
            print(f"D={d} {config}: max |grad diff| {(grad - ref).abs().max().item():.2e} of {ref.abs().max():.1f}")
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-3)
