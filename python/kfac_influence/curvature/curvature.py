"""The fitted curvature: per-layer factors, eigenbases and (corrected) eigenvalues, preconditioning, storage."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import LayerSpec, layer_spec, select_layers
from ..identity import tensors_fingerprint
from ..storage import load_tensors, model_fingerprint, save_tensors
from .config import CurvatureConfig
from .damping import Damping


def tracked_parameters(modules: Mapping[str, nn.Module]):
    for name, m in modules.items():
        for pname, p in m.named_parameters(recurse=False):
            yield f"{name}.{pname}", p


class Curvature:
    """(E)K-FAC curvature of the training loss for the tracked layers.

    Per layer: ``A (d_in', d_in')`` (bias = last coordinate), ``G (d_out, d_out)``, eigenbases ``QA, QG`` with
    eigenvalues ``sA, sG``, and ``Lambda (d_out, d_in')`` (EK-FAC corrected, or ``sG sA^T`` for K-FAC).

    Damping is chosen when preconditioning (``damping=`` / ``damping_mode=``); ``default_damping`` applies when
    none is given (``Damping()``, or the damping stored by an older version in a loaded file).
    """

    def __init__(self, config: CurvatureConfig, specs: Dict[str, LayerSpec], factors: Dict[str, Dict[str, torch.Tensor]],
                 fingerprint: Dict[str, str], num_examples: int, num_draws: int,
                 default_damping: Damping = Damping()):
        self.config = config
        self.default_damping = default_damping
        self.specs = dict(specs)
        self.factors = factors
        self.fingerprint = fingerprint
        self.num_examples = int(num_examples)
        self.num_draws = int(num_draws)
        self._device_cache: Dict = {}
        self._values_fp: Optional[str] = None

    def values_fingerprint(self) -> str:
        """Fingerprint of the configuration and every factor's values (cached: factors are not changed in place
        by this library)."""
        if self._values_fp is None:
            self._values_fp = tensors_fingerprint([self.config.to_dict(), {n: self.factors[n] for n in self.specs}])
        return self._values_fp

    @property
    def module_names(self):
        return list(self.specs)

    def _get(self, name: str, key: str) -> torch.Tensor:
        if name not in self.factors:
            raise KeyError(f"layer {name!r} is not tracked; tracked layers: {self.module_names}")
        return self.factors[name][key]

    def A(self, name: str) -> torch.Tensor:
        return self._get(name, "A")

    def G(self, name: str) -> torch.Tensor:
        return self._get(name, "G")

    def eigenvalues(self, name: str) -> torch.Tensor:
        """Lambda, ``(d_out, d_in + has_bias)``."""
        return self._get(name, "Lambda")

    def eigenbases(self, name: str):
        """``(Q_A, Q_G)``."""
        return self._get(name, "QA"), self._get(name, "QG")

    def resolve_damping(self, damping: Optional[float] = None, damping_mode: Optional[str] = None) -> Damping:
        """The ``Damping`` of a scoring call: ``default_damping`` with the given value / mode replaced."""
        if isinstance(damping, Damping):
            if damping_mode is not None:
                raise ValueError("pass damping_mode inside the Damping, not beside it")
            return damping
        return self.default_damping.with_overrides(damping, damping_mode)

    def layer_damping(self, name: str, damping: Damping) -> float:
        """Absolute lambda of layer ``name`` under ``damping`` (relative mode: rho * mean(Lambda))."""
        return damping.for_layer(self.eigenvalues(name))

    def device_factors(self, name: str, device: torch.device, dtype: torch.dtype):
        """(Q_A, Q_G, Lambda) on a device and dtype, cached."""
        key = (name, str(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(self._get(name, k).to(device=device, dtype=dtype)
                                            for k in ("QA", "QG", "Lambda"))
        return self._device_cache[key]

    def precondition(self, grads: Mapping[str, torch.Tensor], *, damping: Optional[float] = None,
                     damping_mode: Optional[str] = None, backend=None) -> Dict[str, torch.Tensor]:
        """``(G_hat + lambda I)^-1`` applied per layer to ``grads[name]: (Q, d_out, d_in')``; ``damping`` /
        ``damping_mode`` as in ``resolve_damping``."""
        damp = self.resolve_damping(damping, damping_mode)
        out = {}
        for name, v in grads.items():
            spec = self.specs.get(name)
            if spec is None:
                raise KeyError(f"gradient for untracked layer {name!r}")
            if tuple(v.shape[1:]) != spec.grad_shape:
                raise ValueError(f"layer {name!r}: gradient shape {tuple(v.shape[1:])}, expected {spec.grad_shape}")
            qa, qg, lam = self.device_factors(name, v.device, self.config.dtype)
            out[name] = kk.precondition(v.to(self.config.dtype), qa, qg, lam, self.layer_damping(name, damp),
                                        backend=backend)
        return out

    def check_model(self, model: nn.Module, *, check_values: bool = True) -> Dict[str, nn.Module]:
        """The model's tracked modules, after checking they are the ones this curvature was fitted on."""
        try:
            modules = select_layers(model, self.config.modules, self.config.exclude)
        except ValueError as e:
            raise ValueError(f"the model does not match the curvature: {e}") from None
        specs = {n: layer_spec(n, m) for n, m in modules.items()}
        if specs != self.specs:
            missing = sorted(set(self.specs) - set(specs))
            extra = sorted(set(specs) - set(self.specs))
            changed = sorted(n for n in set(specs) & set(self.specs) if specs[n] != self.specs[n])
            raise ValueError(
                "the model's tracked layers differ from those the curvature was fitted on: "
                f"missing {missing[:5]}, unexpected {extra[:5]}, different shape {changed[:5]}")
        if check_values:
            fp = model_fingerprint(tracked_parameters(modules))
            if fp["values"] != self.fingerprint["values"]:
                raise ValueError("the model's weights differ from those the curvature was fitted on "
                                 f"(fingerprint {fp['values']} vs {self.fingerprint['values']}); "
                                 "pass check_values=False to use it anyway")
        return modules

    def save(self, path: os.PathLike) -> None:
        tensors = {f"{name}::{k}": t for name, f in self.factors.items() for k, t in f.items()}
        header = {"kind": "curvature", "config": self.config.to_dict(),
                  "specs": {n: asdict(s) for n, s in self.specs.items()}, "fingerprint": self.fingerprint,
                  "num_examples": self.num_examples, "num_draws": self.num_draws}
        save_tensors(path, tensors, header)


def _spec_from_dict(d: dict) -> LayerSpec:
    d = dict(d)
    for k in ("kernel_size", "stride", "padding", "dilation"):
        d[k] = tuple(d[k])
    return LayerSpec(**d)


def load_curvature(path: os.PathLike, model: nn.Module = None, *, check_values: bool = True) -> Curvature:
    """Load a saved curvature; with ``model``, refuse (ValueError) one whose tracked layers or weights differ."""
    tensors, header = load_tensors(path)
    if header.get("kind") != "curvature":
        raise ValueError(f"{path} holds {header.get('kind')!r}, not a curvature")
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("::", 1)
        factors.setdefault(name, {})[k] = t
    specs = {n: _spec_from_dict(s) for n, s in header["specs"].items()}
    stored = header["config"]
    # files written before damping moved to scoring time keep their damping as the default
    default = Damping(stored["damping"], stored.get("damping_mode", "absolute")) \
        if "damping" in stored else Damping()
    curv = Curvature(CurvatureConfig.from_dict(stored), specs, {n: factors[n] for n in specs},
                     header["fingerprint"], header["num_examples"], header["num_draws"], default_damping=default)
    if model is not None:
        curv.check_model(model, check_values=check_values)
    return curv
