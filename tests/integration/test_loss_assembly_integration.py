"""How a124-system assembles the loss of a step, worked out by hand for each kind of step.

Stand-in guidance slots return chosen values; the own terms are recomputed here from the renders the step made (with
the core loss functions, on the views the method puts them on); the total, the logged values and lambdas, the step
record and the gradient that reaches the field are compared with sum_i w_i * L_i computed here. The weights are chosen
after a first step so that the terms' contributions are 1, 2, 4, ...: dropping, doubling or swapping any weight moves
the total far beyond the tolerance (checked before it is used). The system runs on 8 x 8 renders of a tiny field, its
steps driven the way Lightning's loop drives them (global step, optimizer, ``self.log``), without a Trainer.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SIZE = 8
GUIDANCE = "loss-assembly-fixed-guidance"  # not a124-*: tests that list our registered kinds skip it
# slot -> {output key: (the value it returns, the colour channel whose mean gives its gradient)}
SLOT_VALUES = {"sd": {"sds": (3.0, 0)}, "z123": {"sds": (0.7, 1), "aux": (5.5, 2)},
               "video": {"sds_video": (2.3, 0)}, "cn": {"sds": (1.9, 2)}}
# slot output -> the stage weight that weighs it in these tests (``<slot>_<key>`` for z123's aux, else ``<slot>``)
SLOT_WEIGHT_KEY = {"sd:sds": "sd", "z123:sds": "z123", "z123:aux": "z123_aux", "video:sds_video": "video",
                   "cn:sds": "cn"}
# the kinds of step: (stage, its global step, the clip starts at t = 0, the weight keys of the stage)
OWN = ["normal_smoothness_2d", "sparsity", "opaque", "rgb", "mask", "depth", "time_smoothness"]
STEPS = {
    "image": ("static", 0, False, ["sd", "z123", "z123_aux", *OWN]),
    "video-anchored": ("dynamic", 1, True, ["video", "z123", "z123_aux", "normal_smoothness_2d", "rgb", "mask",
                                            "depth", "time_smoothness"]),
    "video-plain": ("dynamic", 2, False, ["video", "z123", "z123_aux", "normal_smoothness_2d", "rgb", "mask",
                                          "depth", "time_smoothness"]),
    "controlnet": ("refine", 3, False, ["video", "cn", "normal_smoothness_2d", "rgb"]),
}
STAGES = [("static", 1, ["sd", "z123"], None), ("dynamic", 2, ["video", "z123"], ["field_4d", "density_mlp",
                                                                                    "feature_mlp"]),
          ("refine", 1, ["video", "cn"], None)]
# parameter group -> the system's parameter names it holds (written from the geometry's layout, not read from the code)
GROUP_PREFIX = {"field_3d": "geometry.field.encoding.", "field_4d": "geometry.field.encoding_time.",
                "density_mlp": "geometry.field.density_network.", "feature_mlp": "geometry.field.feature_network.",
                "background": "background."}


class FixedGuidance:
    """A guidance slot's stand-in: ``values`` {key: [value, channel]} -> ``loss_<key>`` equal to value exactly, with
    the gradient of mean(rgb[..., channel]). Records each call's inputs."""

    def __init__(self, cfg):
        self.values = {key: (float(v[0]), int(v[1])) for key, v in dict(cfg["values"]).items()}
        self.calls = []

    def __call__(self, rgb, rgb_as_latents=False, **batch):
        self.calls.append({"rgb": rgb, **batch})
        out = {}
        for key, (value, channel) in self.values.items():
            probe = rgb[..., channel].float().mean()
            out[f"loss_{key}"] = value + (probe - probe.detach())
        return out


def _config(rgba: Path, depth: Path, root: Path) -> str:
    slots = "\n".join(
        f"    {name}: {{input: {kind}, guidance_type: {GUIDANCE}, guidance: {{values: "
        f"{{{', '.join(f'{k}: [{v}, {c}]' for k, (v, c) in SLOT_VALUES[name].items())}}}}}}}"
        for name, kind in (("sd", "image"), ("z123", "image"), ("video", "video"), ("cn", "controlnet")))
    return f"""
name: loss-assembly
tag: test
use_timestamp: false
exp_root_dir: {root}
seed: 0
data_type: a124-image-video-datamodule
data:
  image_path: {rgba}
  depth_path: {depth}
  height: {SIZE}
  width: {SIZE}
  random_camera: {{height: {SIZE}, width: {SIZE}, batch_size: 1}}
  video: {{num_frames: 2, height: {SIZE}, width: {SIZE}}}
  eval_height: {SIZE}
  eval_width: {SIZE}
  n_val_frames: 2
  n_test_views: 2
  n_test_frames: 2
system_type: a124-system
system:
  controlnet_condition: current
  time_smoothness_points: 64
  time_smoothness_dt: 0.125
  geometry_type: a124-4d-volume
  geometry:
    radius: 1.0
    time_init_scale: 0.05
    normal_type: finite_difference_forward
    normal_checkpoint: false
    pos_encoding_config: {{n_levels: 2, log2_hashmap_size: 8, base_resolution: 4, per_level_scale: 2.0,
                          implementation: torch}}
    mlp_network_config: {{n_neurons: 8, n_hidden_layers: 1}}
  material_type: no-material
  material: {{n_output_dims: 3, color_activation: sigmoid}}
  background_type: solid-color-background
  background: {{color: [0.5, 0.5, 0.5], learned: true}}
  renderer_type: a124-time-volume-renderer
  renderer: {{num_samples_per_ray: 6, occ_grid_res: 8, occ_n_time_slices: 2, implementation: torch, randomized: false}}
  guidances:
{slots}
  stages: []
  optimizer: {{name: Adam, args: {{betas: [0.9, 0.99], eps: 1.0e-8}}}}
"""


@pytest.fixture(scope="module")
def setup(threestudio, example_rgba, tmp_path_factory):
    """The parsed config (stages left empty) and one training batch with rays."""
    from PIL import Image
    from threestudio.utils.config import load_config

    if GUIDANCE not in threestudio.__modules__:
        threestudio.register(GUIDANCE)(FixedGuidance)
    root = tmp_path_factory.mktemp("loss-assembly")
    depth = root / "depth.png"  # larger = nearer, as animate124 preprocess writes it
    Image.fromarray(np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 8, mode="L").save(depth)
    cfg = load_config(_config(example_rgba, depth, root), from_string=True)
    dm = threestudio.find(cfg.data_type)(cfg.data)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    return cfg, batch


def _stages(weights: dict, stage_name: str) -> list:
    """The three stages, ``stage_name`` weighing ``weights``, the others their slots at 1."""
    return [{"name": name, "steps": steps, "guidances": slots, "trainable": trainable,
             "loss_weights": weights if name == stage_name else {slot: 1.0 for slot in slots},
             "learning_rates": {"field_3d": 0.01, "field_4d": 0.02, "density_mlp": 0.003, "feature_mlp": 0.004,
                                "background": 0.005}}
            for name, steps, slots, trainable in STAGES]


class _Driver:
    """Runs ``training_step`` as Lightning's loop does (the global step, the optimizer of configure_optimizers,
    ``self.log``), without a Trainer; records the renders, the time-smoothness calls and what was logged."""

    def __init__(self, threestudio, cfg, weights: dict, stage_name: str):
        system_cfg = copy.deepcopy(cfg.system)
        system_cfg.stages = _stages(weights, stage_name)
        torch.manual_seed(0)  # every driver builds the same field
        self.system = system = threestudio.find(cfg.system_type)(system_cfg)
        self.trainer = SimpleNamespace(global_step=0, current_epoch=0, optimizers=[system.configure_optimizers()])
        system.trainer = self.trainer
        self.logged, self.renders, self.smoothness = {}, [], []
        system.log = lambda name, value, **kwargs: self.logged.__setitem__(name, float(torch.as_tensor(value).detach()))
        render, smooth = system.renderer.forward, system.geometry.time_smoothness_loss

        def recording_render(**kwargs):
            out = render(**kwargs)
            self.renders.append((kwargs, out))
            return out

        def recording_smoothness(n_points, dt, generator=None):
            value = smooth(n_points, dt, generator=generator)
            self.smoothness.append((n_points, dt, generator, value))
            return value

        system.renderer.forward = recording_render
        system.geometry.time_smoothness_loss = recording_smoothness

    def step(self, global_step: int, batch: dict, stream_state=None):
        self.trainer.global_step = global_step
        for record in (self.logged, self.renders, self.smoothness):
            record.clear()
        if stream_state is not None:
            self.system.generator().set_state(stream_state)
        return self.system.training_step(batch, 0)["loss"]

    def params(self):
        return [(n, p) for n, p in self.system.named_parameters() if p.requires_grad]


def _batch(batch: dict, from_zero: bool) -> dict:
    return {**batch, "video": {**batch["video"], "start_from_zero": from_zero}}


def _expected_terms(driver: _Driver, batch: dict, weights: dict, kind: str) -> dict:
    """Term -> its value with graph, recomputed here from the renders of the step, on the views the method puts
    each term on: the image slots on the random view, the video / ControlNet slots on the clip, the normal smoothness
    on the stage's main render (the random view of image stages, else the clip), sparsity / opaque on the random view,
    the reference terms on the reference view on anchoring steps, the time smoothness on the field."""
    from animate124.core.training import losses

    out = {view: o for kwargs, o in driver.renders for view in batch if kwargs.get("rays_o") is batch[view]["rays_o"]}
    main = "random" if kind == "image" else "video"
    anchor = kind in ("image", "video-anchored")
    slot_view = {"sd": "random", "z123": "random", "video": "video", "cn": "video"}
    terms = {}
    for slot, outputs in SLOT_VALUES.items():
        active = any(w > 0 for k, w in weights.items() if k == slot or k.startswith(f"{slot}_"))
        if not active or (slot_view[slot] != main and not anchor):
            continue
        for key, (value, channel) in outputs.items():
            probe = out[slot_view[slot]]["comp_rgb"][..., channel].mean()
            terms[f"{slot}:{key}"] = value + (probe - probe.detach())
    ref = batch["ref"]
    own = {
        "normal_smoothness_2d": lambda: losses.normal_smoothness_2d(out[main]["comp_normal"]),
        "sparsity": lambda: losses.sparsity(out["random"]["opacity"]),
        "opaque": lambda: losses.opaque(out["random"]["opacity"]),
        "rgb": lambda: losses.rgb_mse(out["ref"]["comp_rgb"], ref["rgb"], ref["mask"], out["ref"]["comp_rgb_bg"]),
        "mask": lambda: losses.mask_bce(out["ref"]["opacity"], ref["mask"]),
        "depth": lambda: losses.depth_pearson(out["ref"]["depth"], ref["ref_depth"], ref["mask"]),
        "time_smoothness": lambda: driver.smoothness[0][3],
    }
    for name, term in own.items():
        if weights.get(name, 0.0) > 0 and (name not in ("rgb", "mask", "depth") or anchor):
            terms[name] = term()
    return terms


def _weight(weights: dict, term: str) -> float:
    """A term's weight: an own term's by its name; a slot output ``<slot>:<key>``'s by ``<slot>_<key>``, else
    ``<slot>`` (the documented rule, written out here)."""
    slot, _, key = term.partition(":")
    return weights.get(f"{slot}_{key}", weights.get(slot)) if key else weights[term]


def _grads(values, params):
    grads = torch.autograd.grad(values, [p for _, p in params], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for (_, p), g in zip(params, grads)]


def _assert_grads(got, expected, what):
    scale = max(float(g.abs().max()) for g in expected)
    assert scale > 0, f"{what}: no gradient reaches the parameters"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * scale, msg=what)


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_loss_is_the_weighted_sum_of_its_terms_and_so_is_its_gradient(threestudio, setup, kind):
    """Catches the terms summed without their weights, one term's weight given to another (a slot's ``<slot>_<key>``
    weight ignored, say), a term computed on the wrong view or on a step it should skip, a term counted twice or
    lost, the logged values or lambdas not those summed, and a weight that does not scale its term's gradient (a
    weight-0 term still pulling on the field)."""
    cfg, base_batch = setup
    stage, global_step, from_zero, keys = STEPS[kind]
    batch = _batch(base_batch, from_zero)
    # 1. a first step with every weight 1 gives the terms' values ...
    probe = _Driver(threestudio, cfg, {k: 1.0 for k in keys}, stage)
    stream = probe.system.generator().get_state()
    probe.step(global_step, batch, stream)
    values = {name: float(v) for name, v in probe.system.last_step.losses.items()}
    # 2. ... and the weights that make the contributions 1, 2, 4, ... (terms that do not run keep weight 3)
    order = sorted(values)
    weights = {k: 3.0 for k in keys}
    for i, term in enumerate(order):
        weights[SLOT_WEIGHT_KEY.get(term, term)] = 2.0**i / values[term]
    contributions = {t: _weight(weights, t) * values[t] for t in order}
    total = sum(contributions.values())
    tolerance = 1e-6 * total  # float32 sums of ~10 terms agree to ~1e-7
    assert min(contributions.values()) > 100 * tolerance  # dropping or doubling any term shows
    for a, b in itertools.combinations(order, 2):  # so does swapping any two weights
        swapped = total - contributions[a] - contributions[b] + _weight(weights, b) * values[a] + \
            _weight(weights, a) * values[b]
        assert abs(swapped - total) > 100 * tolerance, (a, b)

    driver = _Driver(threestudio, cfg, weights, stage)
    loss = driver.step(global_step, batch, stream)
    terms = _expected_terms(driver, batch, weights, kind)
    # the terms that ran: exactly those expected, each with the value recomputed here
    record = driver.system.last_step
    assert sorted(record.losses) == sorted(terms) == order
    for name, value in terms.items():
        assert float(record.losses[name]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), name
        assert record.weights[name] == _weight(weights, name), name
    assert float(loss) == pytest.approx(sum(_weight(weights, t) * float(v) for t, v in terms.items()), rel=1e-6)
    assert float(loss) == pytest.approx(total, rel=1e-6) and float(record.loss) == float(loss)
    # what was logged: every term's value, every weight of the stage, the total
    assert {k[len("train/loss_"):]: v for k, v in driver.logged.items() if k.startswith("train/loss_")} == {
        name: float(record.losses[name]) for name in order}
    assert {k[len("train_params/lambda_"):]: v for k, v in driver.logged.items() if k.startswith("train_params/")} == \
        pytest.approx(weights, rel=1e-6)
    assert driver.logged["train/loss"] == float(loss)
    if "time_smoothness" in terms:  # the system's settings and random stream
        assert driver.smoothness[0][:3] == (64, 0.125, driver.system.generator())

    # the gradient that reaches the field and the background: sum_i w_i grad L_i (renders without jitter: every run
    # below renders the same views alike, so each term's gradient is the same in all of them)
    _, per_term = _assert_weighted_gradient(driver, loss, terms, weights)
    for term in order:
        slot, weight_key = term.partition(":")[0], SLOT_WEIGHT_KEY.get(term, term)
        # weighed alone (every other weight 0) at twice its weight: twice its gradient above
        alone = {**{k: 0.0 for k in keys}, weight_key: 2.0 * weights[weight_key]}
        run = _Driver(threestudio, cfg, alone, stage)
        run_loss = run.step(global_step, batch, stream)
        assert [t for t, w in run.system.last_step.weights.items() if w != 0] == [term]
        got, _ = _assert_weighted_gradient(run, run_loss, _expected_terms(run, batch, alone, kind), alone)
        _assert_grads(got, [2.0 * _weight(weights, term) * g for g in per_term[term]], f"{term} alone x 2")
        # weight 0, the others as before: the term is not computed (a slot output whose slot still runs for another
        # output is computed with weight 0) and the gradient is the others' weighted sum
        zero = {**weights, weight_key: 0.0}
        run = _Driver(threestudio, cfg, zero, stage)
        run_loss = run.step(global_step, batch, stream)
        if any(_weight(zero, f"{slot}:{k}") > 0 for k in SLOT_VALUES.get(slot, ())):
            assert run.system.last_step.weights[term] == 0.0
        else:
            assert term not in run.system.last_step.losses and f"train/loss_{term}" not in run.logged
        others = [sum(_weight(zero, t) * per_term[t][i] for t in terms) for i in range(len(got))]
        _assert_weighted_gradient(run, run_loss, _expected_terms(run, batch, zero, kind), zero, others)


def _assert_weighted_gradient(driver, loss, terms, weights, expected=None):
    """The gradient of the step's loss on every trainable parameter equals sum_i w_i grad L_i, with L_i the terms
    recomputed from the step's renders (or ``expected``); returns it and each term's gradient."""
    params = driver.params()
    per_term = {name: _grads(value, params) for name, value in terms.items()}
    if expected is None:
        expected = [sum(_weight(weights, t) * per_term[t][i] for t in terms) for i in range(len(params))]
    loss.backward()
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
    _assert_grads(got, expected, f"the gradient of {sorted(terms)}")
    return got, per_term


def test_each_stage_trains_its_groups_at_their_learning_rates(threestudio, setup):
    """Catches a parameter group mapped to the wrong module (the 4-D grid's gradient landing on the 3-D grid), a
    frozen group still getting gradient, or a frozen group's learning rate left on."""
    cfg, base_batch = setup
    driver = _Driver(threestudio, cfg, {"video": 1.0, "normal_smoothness_2d": 1.0, "time_smoothness": 1.0}, "dynamic")
    names = [n for n, _ in driver.system.named_parameters()]
    groups = {g: [n for n in names if n.startswith(prefix)] for g, prefix in GROUP_PREFIX.items()}
    assert all(groups.values()) and sorted(sum(groups.values(), [])) == sorted(names)  # every parameter in one group
    driver.step(1, _batch(base_batch, False)).backward()  # the dynamic stage trains field_4d and the MLPs only
    grads = dict(driver.system.named_parameters())
    trained = {"field_4d", "density_mlp", "feature_mlp"}
    for group, members in groups.items():
        moved = [n for n in members if grads[n].grad is not None and float(grads[n].grad.abs().sum()) > 0]
        assert (moved != []) == (group in trained), (group, moved)
        assert all(grads[n].requires_grad == (group in trained) for n in members), group
    lrs = {pg["name"]: pg["lr"] for pg in driver.trainer.optimizers[0].param_groups}
    assert lrs == {"field_3d": 0.0, "field_4d": 0.02, "density_mlp": 0.003, "feature_mlp": 0.004, "background": 0.0}
    by_group = {pg["name"]: {id(p) for p in pg["params"]} for pg in driver.trainer.optimizers[0].param_groups}
    assert by_group == {g: {id(grads[n]) for n in members} for g, members in groups.items()}


def test_controlnet_slot_gets_the_clip_and_its_detached_render_as_condition(threestudio, setup):
    """Catches the ControlNet slot fed another view than the clip, or a condition that carries gradient (the
    ``current`` condition is the clip's render, detached)."""
    cfg, base_batch = setup
    driver = _Driver(threestudio, cfg, {"video": 1.0, "cn": 1.0}, "refine")
    batch = _batch(base_batch, False)
    driver.step(3, batch)
    (call,) = driver.system.guidance_slots.guidances["cn"].calls
    (video_call,) = driver.system.guidance_slots.guidances["video"].calls
    assert call["rgb"] is video_call["rgb"] and call["rays_o"] is batch["video"]["rays_o"]
    assert torch.equal(call["cond_rgb"], call["rgb"]) and not call["cond_rgb"].requires_grad
    assert call["rgb"].requires_grad
