"""The fitted curvature: per-layer factors, eigenbases and (corrected) eigenvalues, preconditioning, storage."""
from __future__ import annotations

import itertools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import LayerSpec, layer_spec, select_layers
from ..identity import tensors_fingerprint
from ..storage import load_tensors, model_fingerprint, write_streamed
from ..tensorfile import TensorFile
from .config import CurvatureConfig
from .damping import Damping


FACTOR_NAMES = ("A", "G", "QA", "QG", "sA", "sG", "Lambda")  # what a stored curvature holds per layer


def factor_layout(name: str, spec: LayerSpec, dtype: torch.dtype) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """``{"<name>::<factor>": (dtype, shape)}`` of one layer's stored factors (all in the curvature's dtype)."""
    di, do = spec.d_in_total, spec.d_out
    shapes = dict(A=(di, di), G=(do, do), QA=(di, di), QG=(do, do), sA=(di,), sG=(do,), Lambda=(do, di))
    return {f"{name}::{k}": (dtype, shapes[k]) for k in FACTOR_NAMES}


class LayerFiles(Mapping):
    """``{layer: {factor: tensor}}`` backed by safetensors files, read a layer at a time when asked for (nothing
    is held): the factors of a curvature bigger than memory (a partitioned fit, ``load_curvature(stream=True)``)."""

    def __init__(self, files: Mapping[str, TensorFile]):
        self.files = dict(files)

    def __getitem__(self, name: str) -> Dict[str, torch.Tensor]:
        got = self.files[name].get_many([f"{name}::{k}" for k in FACTOR_NAMES])
        return {k.rsplit("::", 1)[1]: v for k, v in got.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


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

    ``factors`` is a dict in memory, or ``LayerFiles`` (``streamed``): then each layer is read from its file when
    needed, the device cache holds one layer, and the next layer in module order is read ahead in a thread.
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
        self._lambda_mean: Dict[str, float] = {}
        self._ahead: Optional[Tuple[str, Future]] = None
        self._reader: Optional[ThreadPoolExecutor] = None

    @property
    def streamed(self) -> bool:
        """Whether the factors are read from files a layer at a time."""
        return isinstance(self.factors, LayerFiles)

    def values_fingerprint(self) -> str:
        """Fingerprint of the configuration and every factor's values, a layer at a time (cached: factors are not
        changed in place by this library)."""
        if self._values_fp is None:
            # a generator, not a list: a streamed curvature's layers are read, hashed and dropped one at a time
            # (a list held every layer at once: 6.4 GB on top of the SD-1.5 scoring stage's peak)
            self._values_fp = tensors_fingerprint(
                itertools.chain([self.config.to_dict()], ((n, self.factors[n]) for n in self.specs)))
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
        if damping.mode == "absolute":
            return damping.value
        if name not in self._lambda_mean:
            self._lambda_mean[name] = float(self.eigenvalues(name).double().mean())
        return damping.value * self._lambda_mean[name]

    def device_factors(self, name: str, device: torch.device, dtype: torch.dtype):
        """(Q_A, Q_G, Lambda) on a device and dtype, cached (streamed: this layer only; the next is read ahead)."""
        key = (name, str(device), dtype)
        if key not in self._device_cache:
            if name not in self.specs:
                raise KeyError(f"layer {name!r} is not tracked; tracked layers: {self.module_names}")
            if self.streamed:
                self._device_cache.clear()
                host = self._read_layer(name)
                self._read_ahead(name)
            else:
                host = self.factors[name]
            self._lambda_mean.setdefault(name, float(host["Lambda"].double().mean()))
            self._device_cache[key] = tuple(host[k].to(device=device, dtype=dtype) for k in ("QA", "QG", "Lambda"))
        return self._device_cache[key]

    def _read_layer(self, name: str) -> Dict[str, torch.Tensor]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == name:
            got = ahead[1].result()
        else:
            del ahead  # another layer read ahead: not held beside this one
            got = self.factors.files[name].get_many([f"{name}::{k}" for k in ("QA", "QG", "Lambda")])
        return {k.rsplit("::", 1)[1]: v for k, v in got.items()}

    def _read_ahead(self, name: str) -> None:
        """Start reading the layer after ``name`` (module order) in a background thread."""
        names = self.module_names
        i = names.index(name) + 1
        if i >= len(names):
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curvature-read-ahead")
        nxt = names[i]
        file = self.factors.files[nxt]
        self._ahead = (nxt, self._reader.submit(file.get_many, [f"{nxt}::{k}" for k in ("QA", "QG", "Lambda")]))

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
            qa, qg, lam = self.device_factors(name, v.device, self.config.dtype)  # streamed: reads this layer
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
        """Write the curvature to one safetensors file, a layer at a time (a streamed curvature is never held
        whole), atomically."""
        layout = {}
        for name, spec in self.specs.items():
            layout.update(factor_layout(name, spec, self.config.dtype))
        current: Dict[str, Dict[str, torch.Tensor]] = {}

        def produce(key: str) -> torch.Tensor:
            name, k = key.rsplit("::", 1)
            if name not in current:
                current.clear()
                current[name] = self.factors[name]
            return current[name][k].to(self.config.dtype)

        header = {"kind": "curvature", "config": self.config.to_dict(),
                  "specs": {n: asdict(s) for n, s in self.specs.items()}, "layers": list(self.specs),
                  "fingerprint": self.fingerprint,
                  "num_examples": self.num_examples, "num_draws": self.num_draws}
        write_streamed(path, layout, produce, header)


def _spec_from_dict(d: dict) -> LayerSpec:
    d = dict(d)
    for k in ("kernel_size", "stride", "padding", "dilation"):
        d[k] = tuple(d[k])
    return LayerSpec(**d)


def load_curvature(path: os.PathLike, model: nn.Module = None, *, check_values: bool = True,
                   stream: bool = False) -> Curvature:
    """Load a saved curvature; with ``model``, refuse (ValueError) one whose tracked layers or weights differ.

    ``stream``: read nothing but the header now; each layer's factors are read from the file when a computation
    needs them (for curvatures bigger than memory; ``pairwise_scores`` then reads each layer once)."""
    if stream:
        file = TensorFile(path)
        header = file.header
    else:
        tensors, header = load_tensors(path)
    if header.get("kind") != "curvature":
        raise ValueError(f"{path} holds {header.get('kind')!r}, not a curvature")
    # the header's JSON sorts "specs" by name; "layers" keeps the module order (the order a streamed curvature
    # reads ahead in and the fingerprint hashes in); files written before it get the model's order below
    order = header.get("layers", list(header["specs"]))
    if sorted(order) != sorted(header["specs"]):
        raise ValueError(f"{path}: its header's layer order does not list its layers")
    specs = {n: _spec_from_dict(header["specs"][n]) for n in order}
    if stream:
        missing = [n for n in specs if any(f"{n}::{k}" not in file.keys for k in FACTOR_NAMES)]
        if missing:
            raise ValueError(f"{path}: factors missing for layer(s) {missing[:3]}")
        factors = LayerFiles({n: file for n in specs})
    else:
        factors = {}
        for key, t in tensors.items():
            name, k = key.rsplit("::", 1)
            factors.setdefault(name, {})[k] = t
        factors = {n: factors[n] for n in specs}
    stored = header["config"]
    # files written before damping moved to scoring time keep their damping as the default
    default = Damping(stored["damping"], stored.get("damping_mode", "absolute")) \
        if "damping" in stored else Damping()
    curv = Curvature(CurvatureConfig.from_dict(stored), specs, factors, header["fingerprint"],
                     header["num_examples"], header["num_draws"], default_damping=default)
    if model is not None:
        modules = curv.check_model(model, check_values=check_values)
        curv.specs = {n: curv.specs[n] for n in modules}
    return curv
