"""DynamicField: time independence at init, density bias/activation values, normals, freezing, smoothness loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from checks import bad_input

from animate124.core.field.dynamic_field import DENSITY_ACTIVATIONS, DynamicField, features_to_rgb, trunc_exp

SMALL = dict(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0, implementation="torch")


def make_field(seed=0, **kw):
    return DynamicField(**{**SMALL, **kw}, generator=torch.Generator().manual_seed(seed))


def points_times(n=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) * 2 - 1, torch.rand(n, generator=g)


def zero_last_density_layer(field):
    with torch.no_grad():
        field.density_network.layers[-1].weight.zero_()  # raw density 0 -> sigma = act(bias(x))


def test_zero_temporal_grid_gives_the_same_field_at_every_time():
    field = make_field(time_init_scale=0.0)
    p, _ = points_times()
    outs = [field(p, torch.full((p.shape[0],), t)) for t in (0.0, 0.37, 1.0)]
    for o in outs[1:]:
        assert torch.equal(o["density"], outs[0]["density"]) and torch.equal(o["features"], outs[0]["features"])


def test_default_init_is_nearly_time_independent():
    field = make_field()
    p, _ = points_times()
    h0 = field.encode(p, torch.zeros(p.shape[0]))
    h1 = field.encode(p, torch.ones(p.shape[0]))
    # enc_t is an interpolation of U(-1e-4, 1e-4) entries, so each channel moves by at most 2e-4 between times
    assert 0 < (h1 - h0).abs().max().item() <= 2e-4
    o0, o1 = field(p, torch.zeros(p.shape[0])), field(p, torch.ones(p.shape[0]))
    torch.testing.assert_close(o1["density"], o0["density"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(o1["features"], o0["features"], rtol=0, atol=1e-3)


def test_state_dict_keys_are_stable():
    field = make_field()
    assert sorted(field.state_dict()) == [
        "density_network.layers.0.weight", "density_network.layers.2.weight",
        "encoding.embeddings", "encoding_time.embeddings",
        "feature_network.layers.0.weight", "feature_network.layers.2.weight",
    ]


@pytest.mark.parametrize(
    "bias,activation,expected",
    [
        # |x| = 0.25: magic3d 10 (1 - 0.25 / 0.5) = 5; dreamfusion 10 exp(-0.0625 / (2 * 0.25)) = 10 e^-0.125
        ("blob_magic3d", "softplus", math.log1p(math.exp(5.0))),
        ("blob_dreamfusion", "softplus", math.log1p(math.exp(10 * math.exp(-0.125)))),
        ("none", "exp", 1.0),
        (1.5, "trunc_exp", math.exp(1.5)),
        (-2.0, "softplus", math.log1p(math.exp(-2.0))),
    ],
)
def test_density_bias_and_activation_values(bias, activation, expected):
    field = make_field(density_bias=bias, density_activation=activation)
    zero_last_density_layer(field)
    sigma = field.forward_density(torch.tensor([[0.25, 0.0, 0.0]]), torch.tensor([0.5]))
    assert sigma.shape == (1, 1)
    assert abs(sigma.item() - expected) < 1e-5 * max(1.0, expected)


def test_bad_config_raises_listing_allowed_values():
    with bad_input("density_activation must be one of"):
        make_field(density_activation="relu")
    with bad_input("density_bias"):
        make_field(density_bias="blob")
    with bad_input("times must be"):
        make_field()(torch.zeros(4, 3), torch.zeros(1))
    assert DENSITY_ACTIVATIONS == ("softplus", "exp", "trunc_exp")


def test_trunc_exp_clamps_the_backward():
    x = torch.tensor([1.0, 20.0], requires_grad=True)
    trunc_exp(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([math.e, math.exp(15.0)]))


def test_forward_difference_normals_match_central_ones_with_half_the_density_queries():
    central, forward = make_field(normal_eps=0.01), make_field(normal_eps=0.01, normal_difference="forward")
    forward.load_state_dict(central.state_dict())
    with torch.no_grad():
        for f in (central, forward):  # a field that varies in space and time, beyond the blob
            f.encoding.embeddings.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
            f.encoding_time.embeddings.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(1)
    p = F.normalize(torch.randn(512, 3, generator=g), dim=-1) * (0.2 + 0.5 * torch.rand(512, 1, generator=g))
    t = torch.rand(512, generator=g)
    queries = {}
    for name, f in (("central", central), ("forward", forward)):
        counted = f.forward_density

        def counting(points, times, counted=counted, name=name):
            queries[name] = queries.get(name, 0) + points.shape[0]
            return counted(points, times)

        f.forward_density = counting
        out = f(p, t, output_normal=True)
        queries[name + "_normal"] = out["normal"]
    assert queries["central"] == 6 * 512 and queries["forward"] == 3 * 512
    cos = (queries["central_normal"] * queries["forward_normal"]).sum(-1)
    assert cos.median() > 0.99 and (cos > 0.9).float().mean() > 0.95, cos.quantile(torch.tensor([0.05, 0.5]))
    with pytest.raises(ValueError, match="normal_difference must be 'central' or 'forward'"):
        make_field(normal_difference="backward")


def test_normals_of_a_blob_point_outward():
    # Zero MLP output: sigma = softplus(10 (1 - |x| / 0.5)), a radial blob, so -grad sigma points away from 0.
    field = make_field(normal_eps=0.01)
    zero_last_density_layer(field)
    g = torch.Generator().manual_seed(3)
    p = F.normalize(torch.randn(256, 3, generator=g), dim=-1) * (0.2 + 0.5 * torch.rand(256, 1, generator=g))
    out = field(p, torch.rand(256, generator=g), output_normal=True)
    cos = (out["normal"] * F.normalize(p, dim=-1)).sum(-1)
    assert cos.min().item() > 0.99
    torch.testing.assert_close(out["normal"].norm(dim=-1), torch.ones(256))


def test_time_smoothness_loss_zero_for_constant_positive_otherwise_and_grad_only_to_time_grid():
    field = make_field()
    with torch.no_grad():
        field.encoding_time.embeddings.fill_(0.3)  # enc_t = 0.3 everywhere: independent of t
    g = torch.Generator().manual_seed(0)
    assert field.time_smoothness_loss(n_points=1024, dt=1 / 16, generator=g).item() < 1e-9
    field = make_field()
    loss = field.time_smoothness_loss(n_points=1024, dt=1 / 16, generator=g)
    assert loss.item() > 0
    loss.backward()
    assert field.encoding_time.embeddings.grad.abs().sum() > 0
    assert field.encoding.embeddings.grad is None
    assert all(p.grad is None for n, p in field.named_parameters() if "network" in n)


def test_time_smoothness_loss_formula():
    field = make_field()
    g = torch.Generator().manual_seed(4)
    loss = field.time_smoothness_loss(n_points=64, dt=0.1, generator=g)
    g = torch.Generator().manual_seed(4)
    x, t = torch.rand(64, 3, generator=g), torch.rand(64, 1, generator=g) * 0.9
    enc = field.encoding_time
    ref = ((enc(torch.cat([x, t + 0.1], -1)) - enc(torch.cat([x, t], -1))) / 0.1).square().mean()
    torch.testing.assert_close(loss, ref)


def test_freezing_stops_temporal_gradients_but_keeps_the_grid_in_the_output():
    # a stage without field_4d in `trainable` freezes the grid this way (the system's requires_grad per group)
    field = make_field()
    field.encoding_time.requires_grad_(False)
    p, t = points_times(64)
    out = field(p, t)
    (out["density"].sum() + out["features"].sum()).backward()
    assert field.encoding_time.embeddings.grad is None and field.encoding.embeddings.grad is not None
    with torch.no_grad():
        before = field(p, t)["features"]
        field.encoding_time.embeddings.add_(0.5)
        assert not torch.equal(field(p, t)["features"], before)  # frozen grid still evaluated and added
    field.encoding_time.requires_grad_(True)
    field(p, t)["density"].sum().backward()
    assert field.encoding_time.embeddings.grad.abs().sum() > 0


def test_coarse_to_fine_masks_both_grids_and_rgb_helper():
    field = make_field()
    field.n_active_levels = 2
    assert field.encoding.n_active_levels == 2 and field.encoding_time.n_active_levels == 2
    p, t = points_times(32)
    assert field.encode(p, t)[:, 4:].abs().max().item() == 0.0  # levels 2, 3 (F = 2 channels each) masked
    torch.testing.assert_close(features_to_rgb(torch.zeros(1, 3)), torch.full((1, 3), 0.5))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("difference", ["central", "forward"])
def test_normal_checkpoint_gives_the_same_normals_and_gradients_and_keeps_far_fewer_activations(difference, fused):
    """Checkpointed one offset at a time, or all offsets as one fused query with its own backward
    (``normal_fused``): the plain evaluation's normals (the fused pieces' matrix products may round differently) and
    gradients, with only the queries' inputs kept."""
    fields = [make_field(normal_difference=difference, normal_checkpoint=ckpt, normal_fused=fused)
              for ckpt in (False, True)]
    fields[1].load_state_dict(fields[0].state_dict())
    p, t = points_times(n=2048)
    saved, grads, normals = [], [], []
    for f in fields:
        nbytes = [0]

        def pack(x, nbytes=nbytes):
            nbytes[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = f(p, t, output_normal=True)
        # a loss of the kind the normal-smoothness term makes: through the normals (and the density) only
        (out["normal"].square().sum(-1) * torch.linspace(0, 1, p.shape[0]) + out["normal"][:, 0]
         + 0.1 * out["density"].squeeze(-1)).sum().backward()
        saved.append(nbytes[0])
        normals.append(out["normal"].detach())
        grads.append([torch.zeros_like(q) if q.grad is None else q.grad.clone() for q in f.parameters()])
    torch.testing.assert_close(normals[1], normals[0], rtol=0, atol=1e-6 if fused else 0)
    for a, b in zip(grads[0], grads[1]):  # the same sums in another order (per offset): float32 rounding only
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()))
    assert any(g.abs().sum() > 0 for g in grads[1])
    # the main query's activations stay; the normals' queries (6 or 3 per point) keep only their inputs
    k = 6 if difference == "central" else 3
    assert saved[1] < saved[0] / (1 + 0.6 * k), (saved, k)
