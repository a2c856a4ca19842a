"""Packaging shim: everything is in pyproject.toml. The optional native CPU extension (csrc/) is built only when
KFAC_BUILD_NATIVE=1 and a compiler plus pybind11 are present; a plain ``pip install -e .`` never needs a compiler."""
import os

from setuptools import setup

ext_modules = []
if os.environ.get("KFAC_BUILD_NATIVE") == "1":
    try:
        from pybind11.setup_helpers import Pybind11Extension

        sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith(".cpp")]
        if sources:
            ext_modules.append(Pybind11Extension("kfac_kernels._native", sources,
                                                 extra_compile_args=["-O3", "-fopenmp"],
                                                 extra_link_args=["-fopenmp"]))
    except ImportError:
        pass

setup(ext_modules=ext_modules)
