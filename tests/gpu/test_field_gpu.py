"""The field's fused normal queries on CUDA (compiled Triton grids): the plain evaluation's normals and gradients, the
grids' backward kernels run alone, the kept features not computed again."""

import pytest
import torch

from animate124.core.field.dynamic_field import DynamicField
from animate124.core.field.work_counters import WorkCounts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu tier: torch.cuda.is_available() is False"),
]
MODES = {
    "plain": dict(normal_checkpoint=False),
    "checkpoint": dict(normal_checkpoint=True, normal_fused=False),
    "fused": dict(normal_checkpoint=True, normal_fused=True),
    "fused-keep": dict(normal_checkpoint=True, normal_fused=True, normal_keep_features_gb=1.0),
}


def test_fused_normal_queries_match_the_plain_evaluation_on_cuda():
    n, k = 50_000, 6
    g = torch.Generator().manual_seed(0)
    p = (torch.rand(n, 3, generator=g) * 1.6 - 0.8).cuda()
    t = torch.rand(n, generator=g).cuda()
    weights = torch.randn(n, 3, generator=g).cuda()
    results = {}
    for mode, knobs in MODES.items():
        field = DynamicField(implementation="triton", time_init_scale=0.05, generator=torch.Generator().manual_seed(1),
                             **knobs).cuda()
        with WorkCounts() as wc:
            out = field(p, t, output_normal=True)
            ((out["normal"] * weights).sum() + 0.1 * out["density"].sum() + out["features"].sum()).backward()
        results[mode] = (out["normal"].detach(), [q.grad for q in field.parameters()], dict(wc.counts))
    ref_normal, ref_grads, _ = results["plain"]
    for mode, (normal, grads, counts) in results.items():
        torch.testing.assert_close(normal, ref_normal, rtol=0, atol=1e-5, msg=mode)
        for a, b in zip(grads, ref_grads):  # atomic adds in another order: float32 rounding only
            scale = float(b.abs().max())
            torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-5, msg=mode)
        # grid forwards: the sample's query, the k offset queries, and those again in the backward unless kept
        again = 0 if mode in ("plain", "fused-keep") else k * n
        assert counts["grid4d_fwd"] == n + k * n + again and counts["grid4d_bwd"] == n + k * n, (mode, counts)
        # one launch per grid and query batch: plain 2 + 2 forward, 2 + 2 backward; the others k pieces of ~N queries,
        # forward, again in the backward (not when kept) and backward, besides the sample's own 2 + 2
        launches = {"plain": 8, "checkpoint": 4 + 3 * 2 * k, "fused": 4 + 3 * 2 * k, "fused-keep": 4 + 2 * 2 * k}
        assert counts["triton_launches"] == launches[mode], (mode, counts)
