"""Baselines for attribution, on the same Task and capture machinery as the (E)K-FAC influence pipeline:
TRAK, D-TRAK, Journey-TRAK (Kronecker-projected gradients), TracIn, gradient dot / cosine, pixel or embedding
cosine similarity. All return ``(Q, N)`` score matrices with the package's sign convention."""
from .gradients import iter_example_gradients, projected_gradients
from .projection import KroneckerProjector, ProjectionConfig
from .similarity import embedding_similarity, gradient_similarity, pixel_similarity, tracin_scores
from .tasks import FixedTimestepTask, TrajectoryStepTask
from .trak import TRAKConfig, dtrak_scores, journey_trak_scores, kernel_scores, trak_scores

__all__ = ["KroneckerProjector", "ProjectionConfig", "projected_gradients", "iter_example_gradients",
           "TRAKConfig", "trak_scores", "dtrak_scores", "journey_trak_scores", "kernel_scores",
           "gradient_similarity", "tracin_scores", "embedding_similarity", "pixel_similarity",
           "FixedTimestepTask", "TrajectoryStepTask"]
