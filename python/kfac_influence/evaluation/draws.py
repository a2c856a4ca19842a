"""Variance-reduced (t, eps) draws for DiffusionTask: stratified timesteps and antithetic noise.

``StratifiedDiffusionTask(scheduler, stratified=True, antithetic=True, **DiffusionTask kwargs)``:
  stratified  the M draws of an example cover [0, T) in M equal strata (pairs of draws share a stratum when
              antithetic): ``t_m = floor((pi(m) + u_m) T / M)``, pi a seeded permutation, u_m ~ U[0, 1).
              Every t keeps marginal probability 1/T, so all estimates stay unbiased.
  antithetic  draw 2i+1 reuses draw 2i's timestep with noise ``-eps`` (and MC vector ``-xi``); an odd M leaves the
              last draw unpaired.
Applies to every purpose (fit, train, query) for measurements with uniform t; other measurements keep the base
draws for queries. Everything else is DiffusionTask's (seeding per example, measurements, Fisher vectors).
"""
from __future__ import annotations

from ..tasks.diffusion import DiffusionTask


class StratifiedDiffusionTask(DiffusionTask):
    """DiffusionTask with ``stratified`` (default on) and ``antithetic`` (default off) draws; the logic lives in
    DiffusionTask itself."""

    def __init__(self, scheduler, *, stratified: bool = True, antithetic: bool = False, **kwargs):
        super().__init__(scheduler, stratified=stratified, antithetic=antithetic, **kwargs)
