"""Query gradients, preconditioning and streamed pairwise / self influence scores."""
from .gradients import example_gradients
from .pairwise import pairwise_scores, preconditioned_query_gradients, self_scores

__all__ = ["example_gradients", "pairwise_scores", "preconditioned_query_gradients", "self_scores"]
