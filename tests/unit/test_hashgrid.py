"""Hash-grid encoding: brute-force per-point reference, hand-computed cases, Triton (interpreted) vs torch, masking."""

import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import bad_input

from animate124.core.field.hashgrid import HashGridEncoding

REPO = Path(__file__).resolve().parents[2]
PRIMES = (1, 2654435761, 805459861, 3674653429)
# 4 levels, base 4, doubling, 2**10 table: 3-D levels are dense, dense, hashed, hashed; 4-D dense, then hashed.
SMALL = dict(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)


def _brute_force(x: np.ndarray, table: np.ndarray, d: int, n_levels: int, log2_size: int, base: int,
                 per_level_scale: float) -> np.ndarray:
    """One point at a time, one corner at a time, written from tiny-cuda-nn's formulas (not from our module)."""
    n_feat = table.shape[1]
    out = np.zeros((len(x), n_levels * n_feat))
    offset = 0
    for level in range(n_levels):
        scale = np.float32(2.0) ** (np.float32(level) * np.log2(np.float32(per_level_scale))) * np.float32(base) - 1
        scale = np.float32(scale)
        res = int(np.ceil(scale)) + 1
        size = min(-(-(res**d) // 8) * 8, 2**log2_size)
        for p, point in enumerate(x):
            pos = [np.float32(float(xi) * float(scale) + 0.5) for xi in point]  # fmaf: one rounding
            cell = [int(np.floor(v)) for v in pos]
            frac = [float(v) - c for v, c in zip(pos, cell)]
            for bits in itertools.product((0, 1), repeat=d):
                corner = [c + b for c, b in zip(cell, bits)]
                weight = 1.0
                for b, fr in zip(bits, frac):
                    weight *= fr if b else 1.0 - fr
                index, stride = 0, 1
                for dim in range(d):
                    if stride > size:
                        break
                    index += corner[dim] * stride
                    stride *= res
                if stride > size:  # the level's grid does not fit its table: spatial hash, uint32 arithmetic
                    index = 0
                    for dim in range(d):
                        index ^= (corner[dim] * PRIMES[dim]) & 0xFFFFFFFF
                row = offset + index % size
                out[p, level * n_feat:(level + 1) * n_feat] += weight * table[row]
        offset += size
    return out


# The second layout has fractional scales (4, 7.5, 13.45): cells and fractions not aligned across levels.
@pytest.mark.parametrize("layout", [SMALL, dict(n_levels=3, log2_hashmap_size=10, base_resolution=5,
                                                per_level_scale=1.7)])
@pytest.mark.parametrize("d", [3, 4])
def test_torch_matches_brute_force_on_dense_and_hashed_levels(d, layout):
    gen = torch.Generator().manual_seed(d)
    enc = HashGridEncoding(d, **layout, implementation="torch", init_scale=1.0, generator=gen)
    assert True in enc.levels.dense and False in enc.levels.dense, enc.levels.dense
    corners = torch.tensor([[0.0] * d, [1.0] * d, [0.5] * d, [1.0] + [0.0] * (d - 1)])
    x = torch.cat([corners, torch.rand(12, d, generator=gen)])
    expected = _brute_force(x.numpy(), enc.embeddings.detach().numpy(), d, layout["n_levels"],
                            layout["log2_hashmap_size"], layout["base_resolution"], layout["per_level_scale"])
    torch.testing.assert_close(enc(x), torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-5)


def test_level_layout_of_the_default_3d_grid():
    enc = HashGridEncoding(3)  # 16 levels x 2, 2**19 table, base 16, scale 1.4473 (threestudio's defaults)
    assert enc.level_resolutions[:6] == (16, 24, 34, 49, 71, 102)
    assert enc.level_resolutions[-1] == 4096  # 16 * 2**8: log2(1.4473) = 8 / 15
    sizes = np.diff(enc.level_offsets).tolist()
    # 16**3, 24**3, 34**3, 49**3 (rounded up to a multiple of 8), 71**3 (idem), then the 2**19 table.
    assert sizes == [4096, 13824, 39304, 117656, 357912] + [2**19] * 11
    assert enc.levels.dense == (True,) * 5 + (False,) * 11
    assert enc.embeddings.shape == (sum(sizes), 2) and enc.n_output_dims == 32
    assert [p.shape for p in enc.parameters()] == [enc.embeddings.shape]
    enc4 = HashGridEncoding(4)
    assert np.diff(enc4.level_offsets).tolist()[:3] == [65536, 331776, 2**19]  # 16**4, 24**4, hashed from 34**4


def test_hand_computed_trilinear_values_and_point_gradient():
    # One dense level, base resolution 2: scale 1, 2 x 2 x 2 grid, row i = cx + 2 cy + 4 cz holds (i, 10 i).
    enc = HashGridEncoding(3, n_levels=1, base_resolution=2, implementation="torch")
    assert enc.level_resolutions == (2,) and enc.embeddings.shape == (8, 2)
    with torch.no_grad():
        enc.embeddings.copy_(torch.arange(8.0)[:, None] * torch.tensor([1.0, 10.0]))
    x = torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.25]],
                     requires_grad=True)
    out = enc(x)
    # p = x + 0.5. (0.5,0.5,0.5): p = 1 exactly, the corner (1,1,1) = row 7. (0.25,0,0): p = (.75,.5,.5) and the
    # row is linear in the corner, so the value is .75 + 2*.5 + 4*.5. (0,0,0): .5 + 1 + 2. (1,0,0): p = (1.5,.5,.5):
    # corner x = 2 wraps (row 2 + 2 cy + 4 cz mod 8): 1/4 * [(1+2)/2 + (3+4)/2 + (5+6)/2 + (7+0)/2] = 3.5.
    # (.25,.25,.25): .75 + 1.5 + 3.
    torch.testing.assert_close(out[:, 0], torch.tensor([7.0, 3.75, 3.5, 3.5, 5.25]))
    torch.testing.assert_close(out[:, 1], 10 * out[:, 0])
    (grad_x,) = torch.autograd.grad(out[4, 0], x)  # d/dx of p_x + 2 p_y + 4 p_z with dp/dx = scale = 1
    torch.testing.assert_close(grad_x[4], torch.tensor([1.0, 2.0, 4.0]))


def test_level_masking_zeroes_outputs_and_gradients():
    gen = torch.Generator().manual_seed(1)
    enc = HashGridEncoding(3, **SMALL, implementation="torch", init_scale=1.0, generator=gen)
    x = torch.rand(64, 3, generator=gen)
    full = enc(x)
    enc.n_active_levels = 2
    masked = enc(x)
    assert torch.equal(masked[:, 4:], torch.zeros(64, 4)) and torch.equal(masked[:, :4], full[:, :4])
    masked.square().sum().backward()
    cut = enc.level_offsets[2]
    assert enc.embeddings.grad[cut:].abs().max() == 0 and enc.embeddings.grad[:cut].abs().max() > 0
    enc.n_active_levels = 0
    assert torch.equal(enc(x), torch.zeros(64, 8))
    with pytest.raises(ValueError, match="n_active_levels"):
        enc.n_active_levels = 5


def test_init_range_generator_and_shapes():
    enc = HashGridEncoding(4, **SMALL, generator=torch.Generator().manual_seed(0))
    again = HashGridEncoding(4, **SMALL, generator=torch.Generator().manual_seed(0))
    emb = enc.embeddings.detach()
    assert emb.dtype == torch.float32 and torch.equal(emb, again.embeddings.detach())
    assert emb.abs().max() <= 1e-4 and emb.abs().max() > 0.9e-4 and abs(emb.mean()) < 1e-5
    assert np.diff(enc.level_offsets).tolist() == [256, 1024, 1024, 1024]  # 4**4 dense, then hashed
    out = enc(torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 5, 8) and out.dtype == torch.float32
    assert enc.state_dict().keys() == {"embeddings"}


def test_inputs_outside_unit_cube_are_clamped_and_auto_is_torch_on_cpu():
    gen = torch.Generator().manual_seed(2)
    enc = HashGridEncoding(3, **SMALL, implementation="auto", init_scale=1.0, generator=gen)
    x = torch.rand(32, 3, generator=gen) * 1.6 - 0.3
    ref = HashGridEncoding(3, **SMALL, implementation="torch")
    ref.load_state_dict(enc.state_dict())
    torch.testing.assert_close(enc(x), ref(x.clamp(0, 1)), rtol=0, atol=0)


def test_bad_arguments_raise_value_errors():
    for kwargs, word in [(dict(n_input_dims=0), "n_input_dims"), (dict(n_input_dims=3, n_features_per_level=3),
                         "n_features_per_level"), (dict(n_input_dims=3, implementation="cuda"), "implementation"),
                         (dict(n_input_dims=3, per_level_scale=0.5), "per_level_scale"),
                         (dict(n_input_dims=3, log2_hashmap_size=40), "log2_hashmap_size")]:
        with bad_input(word):
            HashGridEncoding(**kwargs)
    enc = HashGridEncoding(3, **SMALL)
    with bad_input(r"expected \[\.\.\., 3\]"):
        enc(torch.rand(10, 4))
    with pytest.raises(ValueError, match="tcnn|tinycudann"):
        HashGridEncoding(3, **SMALL, implementation="tcnn")(torch.rand(4, 3))  # no CUDA / no tinycudann here


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        HashGridEncoding(3, **SMALL, implementation="triton")(torch.rand(4, 3))


_INTERPRETED_CHECK = """
import os
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
from animate124.core.field.hashgrid import HashGridEncoding
small = dict(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)
for d, n_active in [(3, 4), (4, 4), (3, 3), (4, 1)]:
    gen = torch.Generator().manual_seed(10 + d)
    enc = HashGridEncoding(d, **small, implementation="torch", init_scale=1.0, generator=gen)
    enc.n_active_levels = n_active
    x = torch.cat([torch.rand(150, d, generator=gen), torch.ones(1, d), torch.zeros(1, d)])
    grad_out = torch.randn(x.shape[0], 8, generator=gen)
    results = {}
    for impl in ("torch", "triton"):
        enc.implementation = impl
        out = enc(x)  # embeddings' gradient alone (the usual case) ...
        (grad_emb,) = torch.autograd.grad(out, enc.embeddings, grad_out)
        xg = x.clone().requires_grad_(True)  # ... and together with the points' gradient
        grad_x, grad_emb2 = torch.autograd.grad(enc(xg), [xg, enc.embeddings], grad_out)
        torch.testing.assert_close(grad_emb2, grad_emb, rtol=1e-6, atol=1e-6)
        results[impl] = (out.detach(), grad_emb, grad_x)
    for name, ref, tri in zip(("value", "embeddings grad", "x grad"), results["torch"], results["triton"]):
        assert ref.abs().max() > 0.1, name
        scale = ref.abs().max().item()  # x gradients grow with the level resolution: compare relative to the max
        torch.testing.assert_close(tri / scale, ref / scale, rtol=1e-5, atol=2e-6)
        print(f"D={d} active={n_active} {name}: max |diff| {(tri - ref).abs().max().item():.2e} of max {scale:.2e}")
    if n_active < 4:
        assert results["triton"][0][:, 2 * n_active:].abs().max() == 0
        assert results["triton"][1][enc.level_offsets[n_active]:].abs().max() == 0
# summing runs of consecutive points with the same row (merge_runs_max_res) on samples packed ray after ray: the
# same gradient from fewer atomic adds (lanes the interpreter's atomic sees unmasked, counted)
from animate124.core.field import hashgrid_triton
from triton.runtime import interpreter
added = [0]
plain_atomic = interpreter.InterpreterBuilder.create_atomic_rmw
def counting_atomic(self, op, ptr, val, mask, *args):
    added[0] += int(mask.data.sum())
    return plain_atomic(self, op, ptr, val, mask, *args)
interpreter.InterpreterBuilder.create_atomic_rmw = counting_atomic
gen = torch.Generator().manual_seed(3)
enc = HashGridEncoding(3, **small, implementation="torch", init_scale=1.0, generator=gen)
start, direction = torch.rand(6, 1, 3, generator=gen) * 0.5 + 0.2, torch.randn(6, 1, 3, generator=gen)
x = (start + torch.nn.functional.normalize(direction, dim=-1) * torch.arange(25).view(1, -1, 1) * 0.01).reshape(-1, 3)
grad_out = torch.randn(x.shape[0], 8, generator=gen)
(ref,) = torch.autograd.grad(enc(x), enc.embeddings, grad_out)
adds = {}
for merge in (0, 8, 1000):  # none, the two coarse levels (resolutions 4 and 8), every level
    emb = enc.embeddings.detach().requires_grad_(True)
    config = hashgrid_triton.KernelConfig(64, 4, 64, 4, merge_runs_max_res=merge)
    out = hashgrid_triton.hash_grid_encode_triton(x.contiguous(), emb, enc.levels, enc.n_levels, config=config)
    added[0] = 0
    (grad,) = torch.autograd.grad(out, emb, grad_out)
    adds[merge] = added[0]
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)
    print(f"merge_runs_max_res={merge}: max |diff| {(grad - ref).abs().max().item():.2e}, {adds[merge]} atomic adds")
per_level = adds[0] // 4  # 3 blocks of 64 lanes (150 points; the plain add masks none) x 8 corners x 2 features
assert adds[0] == 4 * 192 * 8 * 2, adds
assert adds[8] < adds[0] - per_level // 2 and adds[1000] < adds[8], adds  # runs are long on the coarse levels
# the backward kernel alone (HashGridEncoding.embedding_grad: the fused normal queries' backward), into a new table or
# added to a given one, as autograd's gradient through the forward
enc = HashGridEncoding(4, **small, implementation="triton", init_scale=1.0, generator=gen)
x, grad_out = torch.rand(150, 4, generator=gen), torch.randn(150, 8, generator=gen)
(ref,) = torch.autograd.grad(enc(x), enc.embeddings, grad_out)
base = torch.randn(ref.shape, generator=gen)
torch.testing.assert_close(enc.embedding_grad(x, grad_out), ref, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(enc.embedding_grad(x, grad_out, out=base.clone()), base + ref, rtol=1e-6, atol=1e-6)
print("ok")
"""


def test_triton_interpreted_matches_torch_values_and_gradients():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed, so there is no Triton backend to compare")
    # Triton reads TRITON_INTERPRET when the kernels are defined, so the check runs in a fresh interpreter.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED_CHECK)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


_COMPILE_CHECK = """
import itertools, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from animate124.core.field import hashgrid_triton as ht
signature = {"x_ptr": "*fp32", "gout_ptr": "*fp32", "emb_ptr": "*fp32", "gemb_ptr": "*fp32", "gx_ptr": "*fp32",
             "table_ptr": "*i32", "N": "i32", "merge_max_res": "i32", **{k: "constexpr" for k in
             ("D", "F", "LF", "NEED_DEMB", "NEED_DX", "MERGE", "BLOCK")}}
for d, merge, need_dx in itertools.product((3, 4), (False, True), (False, True)):
    constants = dict(D=d, F=2, LF=32, NEED_DEMB=True, NEED_DX=need_dx, MERGE=merge, BLOCK=256)
    ptx = triton.compile(ASTSource(fn=ht._hashgrid_bwd_kernel, signature=signature, constexprs=constants),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    atomics = len(re.findall(r"atom\\.global\\S*add\\.f32", ptx))
    dx = 2 * d if need_dx else 0  # dL/dx: one atomic per point (2 per thread) and input dimension
    copies = 2 if merge else 1  # a merging kernel holds the merged and the plain path of a level
    print(d, merge, need_dx, atomics)
    assert atomics == dx + copies * 2 ** d * 2 * 2, atomics  # per thread: 2 points x 2 features, every corner
print("ok")
"""


def test_backward_kernel_compiles_for_sm90():
    """The interpreter runs Python, not Triton's compiler (a kernel it runs can still fail to compile): compile every
    backward variant for sm_90 (no GPU needed) and count its global atomic adds."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_COMPILE_CHECK)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    if "nvidia" in proc.stderr and "No module named" in proc.stderr:
        pytest.skip("triton has no CUDA backend here")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]


def test_deepcopy_drops_cached_tcnn_modules():
    """The system deep-copies the geometry (frozen ControlNet condition); tinycudann modules cannot be copied, so the
    per-device cache is dropped from the copy and rebuilt lazily."""
    import copy
    import threading

    enc = HashGridEncoding(3, **SMALL)
    enc._tcnn_modules["cuda:0"] = threading.Lock()  # stands in for an object that refuses to be copied
    twin = copy.deepcopy(enc)
    assert twin._tcnn_modules == {} and "cuda:0" in enc._tcnn_modules
    x = torch.rand(16, 3)
    torch.testing.assert_close(twin(x), enc(x), rtol=0, atol=0)
