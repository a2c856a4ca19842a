"""kfac_influence: influence functions with (E)K-FAC GGN curvature for diffusion models (and any MSE task).

    from kfac_influence import CurvatureConfig, fit_curvature, pairwise_scores
    from kfac_influence.tasks import DiffusionTask
    task = DiffusionTask(scheduler, num_train_draws=250, num_query_draws=250)
    curv = fit_curvature(model, task, train_images, CurvatureConfig(method="ekfac", fisher="mc"))
    scores = pairwise_scores(model, task, curv, query_images, train_images, damping=1e-8)   # (Q, N)
"""
from .curvature import Curvature, CurvatureConfig, Damping, fit_curvature, load_curvature
from .scoring import pairwise_scores, preconditioned_query_gradients, self_scores

__version__ = "0.1.0"
__all__ = ["CurvatureConfig", "Curvature", "Damping", "fit_curvature", "load_curvature", "pairwise_scores", "self_scores",
           "preconditioned_query_gradients", "__version__"]
