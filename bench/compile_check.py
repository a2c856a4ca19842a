"""Ahead-of-time compile check of every Triton kernel configuration the CUDA launchers can pick, on a CPU.

For each target (sm_80, sm_86, sm_89, sm_90a) and each layer of bench/shapes.py (digits-tiny, cifar-ddpm,
Stable Diffusion 1.5) and operand dtype (float32, bfloat16, float16; int8 queries for pairwise; ranks 8, 32, 128 and
float32 queries for the low-rank pairwise scores), the real op
functions run on ``meta`` tensors with the launch target overridden (``_triton_common.target_override``) and their
launches recorded instead of run (``_triton_common.recording``): so the configuration checked is the one the
launcher's own pure config function picks for that (shape, dtype, capability, shared-memory limit). Each distinct
specialisation (Triton's own JIT binder gives the signature, constexprs and divisibility attributes) is compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and checked:

* it compiles;
* ``metadata.shared`` fits the target's per-block shared memory (163 KB sm_80, 99 KB sm_86 / sm_89, 227 KB
  sm_90a: CUDA C++ Programming Guide, compute capabilities);
* ptxas (the one in the triton wheel, ``-v``) reports 0 bytes of spill stores and loads;
* every kernel that multiplies matrices uses tensor cores: ``wgmma.mma_async`` on sm_90a, ``mma.sync`` elsewhere
  (a cell shows "wgmma+mma" where an sm_90a kernel also has ``mma.sync`` products: the pairwise kernel's batched
  per-example gradient product, a 3-D dot, which Triton lowers to mma.sync only).

One table is printed (rows: kernel and variant; columns: targets; a cell gives the configuration, shared memory
and registers, or what failed) and the exit status is 1 on any violation. ``--fast``: one configuration per
kernel (the first layer and dtype that reaches it), sm_86 and sm_90a only (``tests/test_compile_check.py``).
TRITON_INTERPRET must be unset (the script unsets it before importing triton).

    python bench/compile_check.py [--fast] [--targets T,..] [--layers L,..] [--ops OP,..] [--jobs N] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile for real targets

import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import CIFAR, DIGITS, QUERIES, SD15, layer_dims  # noqa: E402

TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90a": 90}
FAST_TARGETS = ("sm_86", "sm_90a")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NO_DOT = {"_patch_mean_kernel"}  # kernels without a matrix product
# constexprs that name a variant (a row); the block sizes are the configuration (shown in the cell)
VARIANT_KEYS = ("IS_CONV", "APPEND_ONE", "ATOMIC", "HAS_SCALE", "LOW", "SELF_SCORES", "INT8", "DOT2_LOW")
CONFIG_KEYS = ("BLOCK_D", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_B", "BLOCK_Q", "BLOCK_O", "BLOCK_I", "BLOCK_R",
               "BLOCK_J")


def _short(dtype) -> str:
    return str(dtype).split(".")[-1].replace("float", "fp").replace("bfp", "bf")


def layer_calls(s, dtype):
    """(op label, thunk) pairs: each thunk calls an op's Triton function on meta tensors of layer ``s``."""
    from kfac_kernels.ops import covariance as cov, eigen_correction as ec, pairwise as pw, precondition as pc

    r, d_in, d_out = layer_dims(s)
    b = s["batch"]
    one = s.get("bias", True)
    dp = d_in + int(one)
    meta = dict(device="meta")
    calls = []
    if s["kind"] == "conv":
        x = torch.empty(b, s["c_in"], s["hw"], s["hw"], dtype=dtype, **meta)
        conv = dict(kernel_size=s["k"], padding=s["k"] // 2)
        calls.append(("conv_covariance expand", lambda: cov.conv_covariance_triton(x, append_one=one, **conv)))
        # the same conv without a bias, and its input in channels-last memory (other strides, other specialisation)
        calls.append(("conv_covariance expand no-bias", lambda: cov.conv_covariance_triton(x, **conv)))
        x_cl = torch.empty(b, s["hw"], s["hw"], s["c_in"], dtype=dtype, **meta).permute(0, 3, 1, 2)
        calls.append(("conv_covariance expand channels-last", lambda: cov.conv_covariance_triton(
            x_cl, append_one=one, **conv)))
        calls.append(("conv_covariance reduce", lambda: cov.conv_covariance_triton(x, append_one=one, reduce=True,
                                                                                 **conv)))
    else:
        a2 = torch.empty(b * r, d_in, dtype=dtype, **meta)
        calls.append(("linear_covariance", lambda: cov.linear_covariance_triton(a2, append_one=one)))
    a = torch.empty(b, r, d_in, dtype=dtype, **meta)
    g = torch.empty(b, r, d_out, dtype=dtype, **meta)
    qa, qg = torch.empty(dp, dp, dtype=dtype, **meta), torch.empty(d_out, d_out, dtype=dtype, **meta)
    lam = torch.empty(d_out, dp, **meta)
    calls.append(("eigenvalue_correction", lambda: ec.eigenvalue_correction_triton(a, g, qa, qg, append_one=one)))
    if r > 1:
        calls.append(("eigenbasis_self_scores", lambda: ec.eigenbasis_self_scores_triton(
            a, g, qa, qg, lam, 1e-3, append_one=one)))
    v = torch.empty(16, d_out, dp, dtype=dtype, **meta)
    calls.append(("precondition", lambda: pc.precondition_triton(v, qa, qg, lam, 1e-3)))
    p = torch.empty(QUERIES, d_out, dp, dtype=dtype, **meta)
    calls.append(("pairwise_scores", lambda: pw.pairwise_scores_triton(a, g, p, append_one=one)))
    q8 = pw.Int8Queries(torch.empty(QUERIES, d_out, dp, dtype=torch.int8, **meta),
                        torch.empty(QUERIES, **meta), torch.empty(QUERIES, **meta))
    calls.append(("pairwise_scores int8", lambda: pw.pairwise_scores_triton(a, g, q8, append_one=one)))
    calls += lowrank_calls(s, dtype, a, g)
    return calls


LOWRANK_RANKS = (8, 32, 128)  # bench/precision_rank.py's ranks: a runtime argument, they differ in stride divisibility


def lowrank_calls(s, dtype, a, g):
    """lowrank_pairwise_scores as the pipeline calls it (a conv layer's input as ``ConvPatches``, its output
    gradient as the NCHW tensor's (B, R, C) view; queries in the operands' dtype), conv layers also with unfolded
    rows, and half operands also with float32 queries (the kernel's float32 products)."""
    from kfac_kernels.ops import lowrank as lr
    from kfac_kernels.ops.im2col import ConvPatches

    one = s.get("bias", True)
    r, d_in, d_out = layer_dims(s)
    calls = []
    if s["kind"] == "conv":
        x = torch.empty(s["batch"], s["c_in"], s["hw"], s["hw"], dtype=dtype, device="meta")
        g_nchw = torch.empty(s["batch"], d_out, r, dtype=dtype, device="meta").transpose(1, 2)
        inputs = [("", ConvPatches(x, s["k"], 1, s["k"] // 2), g_nchw), (" rows", a, g)]
    else:
        inputs = [("", a, g)]
    for rank in LOWRANK_RANKS:
        for qdtype in dict.fromkeys((dtype, torch.float32)):
            q = lr.LowRankQueries(torch.empty(QUERIES, d_out, rank, dtype=qdtype, device="meta"),
                                  torch.empty(QUERIES, d_in + int(one), rank, dtype=qdtype, device="meta"))
            for tag, aa, gg in inputs:
                label = f"lowrank_pairwise_scores{tag} rank {rank}" + (" fp32 queries" if qdtype != dtype else "")
                calls.append((label, lambda aa=aa, gg=gg, q=q: lr.lowrank_pairwise_scores_triton(
                    aa, gg, q, append_one=one)))
    return calls


def specialise(kernel, target_cc, args, kwargs):
    """Triton's own JIT binder on the recorded arguments: (signature, constexprs, attrs, options dict)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", target_cc, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, spec, opts)
    return signature, constexprs, attrs, {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}


def enumerate_launches(targets, fast: bool, layers=None, ops=None):
    """Distinct compile jobs: a dict key -> job (kernel module/name, specialisation, target, labels); ``layers``
    and ``ops``: substrings of the layer names and op labels to keep (None: all)."""
    from kfac_kernels.ops._triton_common import Target, recording, target_override

    jobs = {}
    seen_kernel = {}
    for tname in targets:
        cc = TARGETS[tname]
        target = Target.of(cc)
        for s in [s for s in DIGITS + CIFAR + SD15 if not layers or any(w in s["name"] for w in layers)]:
            for dtype in DTYPES:
                for op, thunk in layer_calls(s, dtype):
                    if ops and not any(w in op for w in ops):
                        continue
                    with target_override(target), recording() as calls:
                        thunk()
                    for kernel, grid, args, kwargs in calls:
                        name = kernel.fn.__name__
                        sig, cexpr, attrs, opts = specialise(kernel, cc, args, kwargs)
                        named = {kernel.arg_names[k[0]]: v for k, v in cexpr.items()}
                        operand = next((v for k, v in sig.items() if v.startswith("*")), "")
                        variant = " ".join(f"{k}" for k in VARIANT_KEYS if named.get(k) is True)
                        row = f"{name} {operand[1:]}" + (f" {variant}" if variant else "")
                        config = "x".join(str(named[k]) for k in CONFIG_KEYS if k in named)
                        config += f"/{opts.get('num_warps', 4)}w{opts.get('num_stages', 3)}s"
                        key = (tname, name, repr(sorted(sig.items())), repr(sorted(cexpr.items())),
                               repr(sorted(attrs.items())), repr(sorted(opts.items())))
                        if fast:
                            if (tname, name) in seen_kernel and seen_kernel[(tname, name)] != key:
                                continue
                            seen_kernel[(tname, name)] = key
                        job = jobs.setdefault(key, dict(
                            target=tname, cc=cc, smem_limit=target.smem, module=kernel.fn.__module__, kernel=name,
                            signature=sig, constexprs=list(cexpr.items()), attrs=list(attrs.items()), options=opts,
                            row=row, config=config, uses=[]))
                        job["uses"].append(f"{s['name']} {_short(dtype)} {op}")
    return jobs


def compile_one(job):
    """Compile one job for its target; returns the job's result fields (run in a worker process)."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its -v report
    knobs.nvidia.dump_ptxas_log = True
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    t0 = time.time()
    out = io.StringIO()
    res = dict(ok=False, shared=None, regs=None, spill=None, mma=0, wgmma=0, error=None)
    try:
        with contextlib.redirect_stdout(out):
            src = ASTSource(kernel, job["signature"], dict(job["constexprs"]), dict(job["attrs"]))
            k = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32), options=job["options"])
        ptx = k.asm["ptx"]
        log = out.getvalue()
        regs = re.findall(r"Used (\d+) registers", log)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        res.update(ok=True, shared=int(k.metadata.shared), regs=int(regs[-1]) if regs else None,
                   spill=sum(int(a) + int(b) for a, b in spills) if spills else None,
                   mma=len(re.findall(r"\bmma\.sync", ptx)), wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)))
    except Exception as exc:  # noqa: BLE001 - a failed compile is a finding, not a crash
        res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''}"
    res["seconds"] = time.time() - t0
    return res


def violations(job) -> list:
    v = []
    if not job["ok"]:
        return [f"compile: {job['error']}"]
    if job["shared"] > job["smem_limit"]:
        v.append(f"shared {job['shared']} B > {job['smem_limit']} B")
    if job["spill"] is None:
        v.append("no ptxas report")
    elif job["spill"] > 0:
        v.append(f"spills {job['spill']} B")
    if job["kernel"] not in NO_DOT:
        if job["cc"] >= 90 and not job["wgmma"]:
            v.append("no wgmma")
        elif job["cc"] < 90 and not job["mma"]:
            v.append("no mma")
    return v


def cell(jobs) -> str:
    """One table cell: the jobs of a (variant, target) grouped by configuration; the specialisations of one
    configuration (divisibility of the shapes' strides and sizes) differ only in their register counts."""
    parts = []
    groups = {}
    for j in jobs:
        groups.setdefault(j["config"], []).append(j)
    for config in sorted(groups):
        js = groups[config]
        bad = sorted({v for j in js for v in violations(j)})
        ok = [j for j in js if j["ok"]]
        if not ok:
            parts.append(f"**{'; '.join(bad)}** {config}")
            continue
        regs = sorted(j["regs"] or 0 for j in ok)
        tc = "/".join(sorted({"+".join(n for n in ("wgmma", "mma") if j[n]) or "-" for j in ok}))
        text = (f"{config} {max(j['shared'] for j in ok) // 1024}K "
                f"r{regs[0]}{'-' + str(regs[-1]) if regs[-1] != regs[0] else ''} {tc}"
                + (f" ({len(js)})" if len(js) > 1 else ""))
        parts.append(("**" + "; ".join(bad) + "** " + text) if bad else text)
    return "<br>".join(parts)


def table(jobs, targets) -> str:
    rows = {}
    for j in jobs:
        rows.setdefault(j["row"], {}).setdefault(j["target"], []).append(j)
    lines = ["| kernel / variant | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for row in sorted(rows):
        lines.append(f"| {row} | " + " | ".join(cell(rows[row].get(t, [])) for t in targets) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="one configuration per kernel, sm_86 and sm_90a")
    ap.add_argument("--targets", default=None, help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--layers", default=None, help="comma-separated substrings of layer names to keep")
    ap.add_argument("--ops", default=None, help="comma-separated substrings of op labels to keep "
                    "(e.g. lowrank_pairwise_scores)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for the compiles")
    ap.add_argument("--json", default=None, help="write every compile's result here")
    ap.add_argument("--table-from", default=None, help="print the table of a --json file (no compiling)")
    args = ap.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            jobs = json.load(f)
        print(table(jobs, [t for t in TARGETS if any(j["target"] == t for j in jobs)]))
        return 1 if any(violations(j) for j in jobs) else 0
    targets = args.targets.split(",") if args.targets else list(FAST_TARGETS if args.fast else TARGETS)
    t0 = time.time()
    jobs = list(enumerate_launches(targets, args.fast, args.layers.split(',') if args.layers else None,
                                   args.ops.split(',') if args.ops else None).values())
    n_uses = sum(len(j["uses"]) for j in jobs)
    print(f"{n_uses} launches at the bench/shapes.py layers -> {len(jobs)} distinct compiles for "
          f"{', '.join(targets)}", flush=True)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(compile_one, jobs))
    else:
        results = [compile_one(j) for j in jobs]
    for j, r in zip(jobs, results):
        j.update(r)
    bad = [(j, violations(j)) for j in jobs if violations(j)]
    print(table(jobs, targets))
    for j, v in bad:
        print(f"VIOLATION {j['target']} {j['row']} {j['config']}: {'; '.join(v)} (e.g. {j['uses'][0]})")
    print(f"\n{len(jobs)} compiles, {len(bad)} with violations; {time.time() - t0:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(jobs, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
