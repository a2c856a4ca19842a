"""The ``kfac-influence`` application: the attribution pipeline as resumable stages in one output folder.

    settings.py      RunConfig and its sections (frozen, validated; JSON form; earlier run.json forms upgraded)
    fingerprints.py  what each stage's outputs depend on; the software environment
    layout.py        the run folder: stages, their folders and outputs, dependencies, ownership checks, StageError
    lock.py          OUT/.lock: one command at a time per run folder
    context.py       what the stages of one command share (data, models, samples, scores, task, curvature)
    stages.py        the stage bodies (train, sample, fit, score, report)
    runner.py        Pipeline: skip, run and record stages (manifests, input identities, swap on success); run.json
    cli.py           the ``kfac-influence`` command (``python -m kfac_influence``)

The library it drives (``kfac_influence.curvature``, ``scoring``, ``diffusion``, ``report``) never imports it.
"""
from .layout import STAGES, StageError
from .runner import Pipeline
from .settings import FitConfig, ModelConfig, ReportConfig, RunConfig, SampleConfig, ScoreConfig

__all__ = ["RunConfig", "ModelConfig", "SampleConfig", "FitConfig", "ScoreConfig", "ReportConfig", "Pipeline",
           "StageError", "STAGES"]
