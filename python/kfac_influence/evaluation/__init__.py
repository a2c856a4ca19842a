"""Evaluation of attributions: LDS (subsets, retraining, ground truth, oracle ceiling) and retraining without the
top-scored examples. See ``lds`` for the protocol and sign convention."""
from .ground_truth import diffusion_train_fn, measure_all, task_measurements
from .lds import LDSConfig, LDSRun, lds, make_subsets, oracle_ceiling, removed_score_sums
from .stats import MeanSE, paired_difference, spearman_rows

__all__ = ["LDSConfig", "LDSRun", "lds", "make_subsets", "oracle_ceiling", "removed_score_sums", "MeanSE",
           "paired_difference", "spearman_rows", "task_measurements", "measure_all", "diffusion_train_fn"]
from .retrain_top import RetrainTopConfig, RetrainTopResult, retrain_top  # noqa: E402

__all__ += ["RetrainTopConfig", "RetrainTopResult", "retrain_top"]
