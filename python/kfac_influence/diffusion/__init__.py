"""Diffusion-model side of the pipeline: data, model presets, DDPM training and sampling."""
from .data import DataConfig, DataError, ImageDataset, load_dataset  # noqa: F401
from .models import PRESETS, ModelError, SchedulerConfig, build_model, load_model, make_scheduler  # noqa: F401
from .sampling import SampleResult, ddpm_sample, default_timesteps, trajectory_logprob  # noqa: F401
from .training import TrainConfig, TrainResult, train  # noqa: F401
