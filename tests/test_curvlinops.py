"""Our K-FAC factors equal curvlinops 3.0.1 KFACLinearOperator on a diffusers UNet2DModel with attention
(design.md: factor 1 for type2 vs "type-2"; for empirical, curvlinops' product is D times ours; expand and
reduce).

Each of our draws is one curvlinops data point: X = {x_t, t}, y = eps, model output flattened to (B, D),
MSELoss(reduction="mean"). A Kronecker product is compared factor-free: A1 (x) G1 == A2 (x) G2 iff the
normalised factors agree and the norm products agree.
"""
import pytest
import torch

from kfac_influence import CurvatureConfig, fit_curvature
from kfac_influence.tasks import DiffusionTask

from helpers import scheduler, tiny_unet

curvlinops = pytest.importorskip("curvlinops")


class Flat(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, X):
        return self.unet(X["x_t"], X["t"]).sample.flatten(1)


def assert_same_kron(A1, G1, A2, G2, factor, name):
    na1, ng1, na2, ng2 = (torch.linalg.norm(m) for m in (A1, G1, A2, G2))
    torch.testing.assert_close(A1 / na1, A2 / na2, rtol=1e-9, atol=1e-12, msg=f"{name}: A direction")
    torch.testing.assert_close(G1 / ng1, G2 / ng2, rtol=1e-9, atol=1e-12, msg=f"{name}: G direction")
    torch.testing.assert_close(factor * na1 * ng1, na2 * ng2, rtol=1e-9, atol=0, msg=lambda m: f"{name}: scale ratio {float(na1 * ng1 / (na2 * ng2))}")


@pytest.mark.parametrize("fisher,cl_fisher,approx", [
    ("type2", "type-2", "expand"), ("type2", "type-2", "reduce"),
    ("empirical", "empirical", "expand"), ("empirical", "empirical", "reduce"),
])
def test_factors_match_curvlinops(fisher, cl_fisher, approx):
    from curvlinops import KFACLinearOperator

    unet = tiny_unet(size=4)
    task = DiffusionTask(scheduler(), num_train_draws=2)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1
    cfg = CurvatureConfig(method="kfac", approx=approx, fisher=fisher, dtype=torch.float64, seed=3)
    curv = fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False)

    rows = task.draws(x, torch.arange(3), "fit", num_draws=2, seed=3)
    data = [({"x_t": rows.data["x_t"][s:s + 4], "t": rows.data["t"][s:s + 4]},
             rows.data["target"][s:s + 4].flatten(1)) for s in range(0, len(rows), 4)]
    model = Flat(unet)
    params = [p for n, m in unet.named_modules() if n in curv.module_names for p in m.parameters(recurse=False)]
    op = KFACLinearOperator(model, torch.nn.MSELoss(reduction="mean"), params, data, fisher_type=cl_fisher,
                            kfac_approx=approx, separate_weight_and_bias=False, check_deterministic=False,
                            num_data=len(rows), batch_size_fn=lambda X: X["x_t"].shape[0])
    op.compute_kronecker_factors()
    D = x[0].numel()
    factor = 1.0 if fisher == "type2" else float(D)
    assert len(curv.module_names) > 40  # convs, time MLP, attention projections
    for name in curv.module_names:
        key = f"unet.{name}"
        assert_same_kron(curv.A(name), curv.G(name), op._input_covariances[key], op._gradient_covariances[key],
                         factor, name)
