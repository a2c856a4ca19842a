"""Scores of every method on the LDS digits benchmark, and the tables (imported by bench/lds_digits.py).

Cost-saving structure (same numbers as the streamed pipeline, which the tests pin): for a given model and draw
scheme, the exact per-example training gradients ``(N, d_out, d_in')`` and query gradients are computed ONCE and
cached (N = 128 examples of a 41k-parameter model: ~20 MB), then every (E)K-FAC variant's scores are
``<precondition(query grads), train grads>``; K-FAC is derived from the EK-FAC fit (same factors, Lambda = sG sA^T);
damping sweeps reuse the fit. TRAK / gradient similarity use the same gradients (TRAK through the Kronecker
projection); D-TRAK, Journey-TRAK and TracIn run their own library passes.

Class-conditional run (``lds_digits.py --conditional``): every task is ``DiffusionTask(condition="class")`` (D-TRAK's
and Journey-TRAK's too), training data ``(images, labels)`` and queries ``(images, query labels)``, so each
training example's gradient is taken under its own class and each query's under the class it was generated for;
``run_conditional`` writes the Figure 2 table and the exact same-class fraction of each method's top influences.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Dict

import torch

from kfac_influence import CurvatureConfig, fit_curvature, load_curvature
from kfac_influence.baselines import (KroneckerProjector, ProjectionConfig, TRAKConfig, embedding_similarity,
                                      journey_trak_scores, kernel_scores, tracin_scores, trak_scores)
from kfac_influence.baselines.tasks import FixedTimestepTask
from kfac_influence.baselines.trak import dtrak_timesteps
from kfac_influence.capture import LayerCapture, select_layers
from kfac_influence.curvature.curvature import Curvature
from kfac_influence.curvature.damping import Damping
from kfac_influence.evaluation import paired_difference
from kfac_influence.scoring import example_gradients
from kfac_influence.storage import load_tensors, save_tensors
from kfac_influence.tasks import DiffusionTask

ABS_DAMPINGS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
REL_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
TRAK_DAMPINGS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
BATCH = 256


class Bench:
    def __init__(self, root: Path, S, images, q, run, gt, build_full, draw_seed: int = 1):
        self.root, self.S, self.images, self.q, self.run, self.gt = root, S, images, q, run, gt
        self.build_full = build_full
        # draw seed: train/query draws use task seed ``draw_seed``, curvature (fit) draws ``draw_seed + 1``;
        # the default 1 is the original run (task seed 1, fit seed 2) and keeps its cache names
        self.draw_seed = int(draw_seed)
        self.sfx = "" if self.draw_seed == 1 else f"_ds{self.draw_seed}"
        self.cache = root / "scores"
        import lds_digits as LD
        if LD.S is not S:
            raise RuntimeError("lds_methods must run with the settings of the lds_digits module it imports")
        # class-conditional: tasks take (images, labels) and (query images, query labels); else the images
        self.condition = "class" if LD.conditional() else None
        self.train_data = (images, LD.load_labels()) if self.condition else images
        self.query_data = LD.query_data(q)
        from kfac_influence.diffusion import make_scheduler
        self.sch = make_scheduler()
        self.times: Dict[str, float] = {}

    # ---- caching -----------------------------------------------------------------------------------------
    def cached(self, name: str, fn):
        path = self.cache / f"{name}.safetensors"
        if path.exists():
            return load_tensors(path)[0]
        t0 = time.time()
        out = fn()
        out = {"x": out} if torch.is_tensor(out) else out
        save_tensors(path, {k: v.detach().float().cpu().contiguous() for k, v in out.items()}, {"kind": "bench"})
        self.times[name] = time.time() - t0
        print(f"  {name}: {self.times[name]:.0f} s", flush=True)
        return load_tensors(path)[0]

    def model(self, key: str):
        if key == "final":
            return self.build_full()
        kind, steps = key.split("@")
        return self.build_full(steps=int(steps), raw=(kind == "raw"))

    def task(self, measurement: str = "loss", draws: str = "uniform", **kw):
        common = dict(num_train_draws=self.S.draws, num_query_draws=self.S.draws, measurement=measurement,
                      seed=self.draw_seed, condition=self.condition)
        common.update(kw)
        return DiffusionTask(self.sch, stratified="strat" in draws, antithetic="anti" in draws, **common)

    def train_grads(self, model_key="final", draws="uniform"):
        def fn():
            m = self.model(model_key)
            return example_gradients(m, self.task(draws=draws), select_layers(m), self.train_data, purpose="train",
                                     draws_per_forward=BATCH)
        return self.cached(f"tg_{model_key}_{draws}{self.sfx}", fn)

    def query_grads(self, measurement="loss", model_key="final", draws="uniform", tag="", **kw):
        def fn():
            m = self.model(model_key)
            return example_gradients(m, self.task(measurement, draws=draws, **kw), select_layers(m),
                                     self.query_data, purpose="query", draws_per_forward=BATCH)
        return self.cached(f"qg_{model_key}_{draws}_{measurement}{tag}{self.sfx}", fn)

    def curvature(self, approx="expand", fisher="mc", model_key="final", draws="uniform") -> Curvature:
        path = self.cache / f"curv_{model_key}_{draws}_{approx}_{fisher}{self.sfx}.safetensors"
        m = self.model(model_key)
        if not path.exists():
            t0 = time.time()
            cfg = CurvatureConfig(method="ekfac", approx=approx, fisher=fisher, num_draws=self.S.draws,
                                  seed=self.draw_seed + 1)
            fit_curvature(m, self.task(draws=draws), self.train_data, cfg, draws_per_forward=BATCH,
                          progress=False).save(path)
            print(f"  fit {path.name}: {time.time() - t0:.0f} s", flush=True)
        return load_curvature(path, m)

    @staticmethod
    def variant(curv: Curvature, method="ekfac", damping=1e-8, mode="absolute") -> Curvature:
        """The fit as K-FAC or EK-FAC, with ``damping`` as its default (one fit serves the whole sweep)."""
        cfg = dataclasses.replace(curv.config, method=method)
        factors = curv.factors
        if method == "kfac":
            factors = {n: {**f, "Lambda": torch.outer(f["sG"], f["sA"]).to(f["Lambda"].dtype)}
                       for n, f in factors.items()}
        return Curvature(cfg, curv.specs, factors, curv.fingerprint, curv.num_examples, curv.num_draws,
                         default_damping=Damping(float(damping), mode))

    @staticmethod
    def influence(curv: Curvature, qg, tg) -> torch.Tensor:
        pre = curv.precondition({n: qg[n] for n in curv.specs})
        return sum(pre[n].double().flatten(1) @ tg[n].double().flatten(1).T for n in curv.specs).float()

    # ---- LDS ---------------------------------------------------------------------------------------------
    def lds(self, scores, target="loss"):
        return self.run.lds(scores, self.gt[target])

    def sweep(self, curv, qg, tg, target, method="ekfac", modes=("absolute", "relative")):
        """{(mode, damping): MeanSE} over the damping grid."""
        out = {}
        for mode in modes:
            for d in (ABS_DAMPINGS if mode == "absolute" else REL_DAMPINGS):
                out[(mode, d)] = self.lds(self.influence(self.variant(curv, method, d, mode), qg, tg), target)
        return out


def best(sweep: dict, mode=None):
    items = [(k, v) for k, v in sweep.items() if mode is None or k[0] == mode]
    return max(items, key=lambda kv: kv[1].mean if kv[1].mean == kv[1].mean else -9)


def fmt(r) -> str:
    return r.percent(1)


def run_methods(root: Path, S, images, q, run, gt, stage="all"):
    import lds_digits as LD
    b = Bench(root, S, images, q, run, gt,
              lambda steps=None, raw=False: LD.full_model(root, images, steps=steps, raw=raw))
    t_start = time.time()
    res: Dict[str, dict] = {"settings": dataclasses.asdict(S)}
    lines = []
    P = lambda s="": (print(s, flush=True), lines.append(s))  # noqa: E731

    tg = b.train_grads()
    qg = {t: b.query_grads(t) for t in ("loss", "elbo")}
    oracle = {t: run.oracle(gt[t]) for t in ("loss", "elbo")}

    # ---- Figure 4 ablation: expand/reduce x mc/empirical x K-FAC/EK-FAC, damping sweep -----------------
    abl = {}
    for approx in ("expand", "reduce"):
        for fisher in ("mc", "empirical"):
            curv = b.curvature(approx, fisher)
            for method in ("kfac", "ekfac"):
                for t in ("loss", "elbo"):
                    abl[(approx, fisher, method, t)] = b.sweep(curv, qg[t], tg, t, method)
    main = {}
    for t in ("loss", "elbo"):
        main[t] = {}
        (kp, kd), kr = best(abl[("expand", "mc", "kfac", t)], "absolute")
        main[t]["K-FAC expand MC (paper recipe, tuned abs. damping)"] = (kr, f"{kp} {kd:g}")
        (ep, ed), er = best(abl[("expand", "mc", "ekfac", t)], "absolute")
        main[t]["EK-FAC expand MC (camera-ready, tuned abs. damping)"] = (er, f"{ep} {ed:g}")

    # ---- baselines ---------------------------------------------------------------------------------------
    baseline_rows(b, main, qg, tg)
    for t in ("loss", "elbo"):
        main[t]["Oracle (retraining, seed vs mean of other seeds)"] = (oracle[t], "")

    P("### Figure 2 analogue: LDS (%) by method and measurement target")
    P("")
    P("| method | LDS loss | LDS ELBO | setting (loss / ELBO) |")
    P("|---|---|---|---|")
    for name in main["loss"]:
        P(f"| {name} | {fmt(main['loss'][name][0])} | {fmt(main['elbo'][name][0])} | "
          f"{main['loss'][name][1]} / {main['elbo'][name][1]} |")
    P("")
    P("### Figure 4 analogue: ablation (loss target; best damping of the grid per row, absolute / relative)")
    P("")
    P("| approx | Fisher | K-FAC abs | K-FAC rel | EK-FAC abs | EK-FAC rel |")
    P("|---|---|---|---|---|---|")
    for approx in ("expand", "reduce"):
        for fisher in ("mc", "empirical"):
            cells = []
            for method in ("kfac", "ekfac"):
                for mode in ("absolute", "relative"):
                    (_, d), r = best(abl[(approx, fisher, method, "loss")], mode)
                    cells.append(f"{fmt(r)} (λ={d:g})")
            P(f"| {approx} | {fisher} | " + " | ".join(cells) + " |")
    P("")
    P("### Damping sweep (loss target, expand + MC)")
    P("")
    P("| damping | K-FAC | EK-FAC |")
    P("|---|---|---|")
    for mode in ("absolute", "relative"):
        for d in (ABS_DAMPINGS if mode == "absolute" else REL_DAMPINGS):
            P(f"| {mode} {d:g} | {fmt(abl[('expand', 'mc', 'kfac', 'loss')][(mode, d)])} | "
              f"{fmt(abl[('expand', 'mc', 'ekfac', 'loss')][(mode, d)])} |")
    P("")

    if stage == "table" or True:
        past = go_past(b, abl, qg, tg, P)
        res["past"] = past
    res["main"] = {t: {k: [v[0].mean, v[0].sem, v[1]] for k, v in main[t].items()} for t in main}
    res["times"] = b.times
    res["methods_wall_s"] = time.time() - t_start
    (root / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (root / "tables.md").write_text("\n".join(lines) + "\n")
    print(f"methods done in {time.time() - t_start:.0f} s", flush=True)


def dtrak_task(b: Bench) -> FixedTimestepTask:
    return FixedTimestepTask(b.sch, dtrak_timesteps(10, 1000), output="square_norm", num_train_draws=10,
                             num_query_draws=10, measurement="square_norm", seed=3, condition=b.condition)


def journey_trak(b: Bench, model):
    """Journey-TRAK scores (Q, N), cached; a conditional run scores each trajectory under its query's class."""
    cond = dict(condition=b.condition, query_condition=b.q["labels"]) if b.condition else {}
    return b.cached("journey_trak", lambda: journey_trak_scores(
        model, b.sch, b.q["trajectory"], b.q["timesteps"], b.train_data, TRAKConfig(damping=1e-2), num_steps=10,
        num_train_draws=4, draws_per_forward=BATCH, **cond))["x"]


def tracin(b: Bench):
    tracin_task = b.task("loss", num_train_draws=16, num_query_draws=16)
    return b.cached("tracin", lambda: tracin_scores(
        [(b.model(f"raw@{s}"), 2e-3) for s in b.S.checkpoints], tracin_task, b.query_data, b.train_data,
        draws_per_forward=BATCH))["x"]


def baseline_rows(b: Bench, main: dict, qg, tg) -> Dict[str, Dict[str, torch.Tensor]]:
    """Add the baselines' rows ``main[target][name] = (MeanSE, setting)`` for targets loss and elbo; returns each
    row's score matrix ``{target: {name: (Q, N)}}`` (at its tuned damping)."""
    model = b.model("final")
    specs = LayerCapture(select_layers(model)).specs
    proj = KroneckerProjector(specs, ProjectionConfig(dim_in=16, dim_out=16, seed=0))
    phi = proj.project_gradients({n: tg[n].double() for n in specs}).float()
    scores = {t: {} for t in ("loss", "elbo")}
    for t in ("loss", "elbo"):
        psi = proj.project_gradients({n: qg[t][n].double() for n in specs}).float()
        sw = {d: b.lds(kernel_scores(psi, phi, d, "relative"), t) for d in TRAK_DAMPINGS}
        d, r = max(sw.items(), key=lambda kv: kv[1].mean)
        name = "TRAK (Kronecker proj. 16x16/layer, tuned damping)"
        main[t][name] = (r, f"rel {d:g}")
        scores[t][name] = kernel_scores(psi, phi, d, "relative")
    feats = b.cached("dtrak_features", lambda: dict(zip(("s", "phi", "psi"), trak_scores(
        model, dtrak_task(b), b.query_data, b.train_data, TRAKConfig(), draws_per_forward=BATCH,
        return_features=True))))
    for t in ("loss", "elbo"):
        sw = {d: b.lds(kernel_scores(feats["psi"], feats["phi"], d, "relative"), t) for d in TRAK_DAMPINGS}
        d, r = max(sw.items(), key=lambda kv: kv[1].mean)
        name = "D-TRAK (square norm, 10 timesteps, tuned damping)"
        main[t][name] = (r, f"rel {d:g}")
        scores[t][name] = kernel_scores(feats["psi"], feats["phi"], d, "relative")
    jt = journey_trak(b, model)
    tr = tracin(b)
    dot = {t: sum(qg[t][n].double().flatten(1) @ tg[n].double().flatten(1).T for n in specs) for t in qg}
    tnorm = sum(tg[n].double().flatten(1).pow(2).sum(1) for n in specs).sqrt()
    pix = embedding_similarity(b.q["images"], b.images)
    for t in ("loss", "elbo"):
        qn = sum(qg[t][n].double().flatten(1).pow(2).sum(1) for n in specs).sqrt()
        rows = {"Journey-TRAK (10 steps)": (jt, "rel 1e-2"), "TracIn (4 raw checkpoints)": (tr, ""),
                "Gradient dot product": (dot[t], ""), "Gradient cosine": (dot[t] / (qn[:, None] * tnorm[None]), ""),
                "Pixel cosine": (pix, "")}
        for name, (sc, setting) in rows.items():
            main[t][name] = (b.lds(sc, t), setting)
            scores[t][name] = sc
    return scores


def same_class_fraction(scores: torch.Tensor, query_labels: torch.Tensor, train_labels: torch.Tensor,
                        k: int = 6) -> Dict[str, float]:
    """Exact same-class fractions from the labels: of the k largest scores per query (top positive influences)
    and of the k smallest (top negative), over all queries; ``chance``: the fraction of all training examples
    that share the query's class. ``scores (Q, N)``, ``query_labels (Q,)``, ``train_labels (N,)``; ties are broken
    by training index (stable sort)."""
    s = torch.as_tensor(scores).double()
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    neg = torch.sort(s, dim=1, descending=False, stable=True).indices
    y, qy = train_labels.long(), query_labels.long()[:, None]
    return {"positive": float((y[order[:, :k]] == qy).double().mean()),
            "negative": float((y[neg[:, :k]] == qy).double().mean()),
            "chance": float((y[None, :] == qy).double().mean())}


def run_conditional(root: Path, S, images, q, run, gt, k: int = 6):
    """The class-conditional run's tables: LDS (%) of (E)K-FAC (expand MC, uniform and stratified + antithetic
    draws, tuned absolute damping), the baselines and the oracle on targets loss and ELBO, and the exact same-class
    fraction of each method's top-k positive / negative influences (loss target, at the tuned setting).
    Writes ``root/results.json`` and ``root/tables.md``."""
    import lds_digits as LD
    b = Bench(root, S, images, q, run, gt,
              lambda steps=None, raw=False: LD.full_model(root, images, steps=steps, raw=raw))
    t_start = time.time()
    lines = []
    P = lambda s="": (print(s, flush=True), lines.append(s))  # noqa: E731
    main: Dict[str, dict] = {"loss": {}, "elbo": {}}
    scores: Dict[str, dict] = {"loss": {}, "elbo": {}}
    for draws, label in (("uniform", "uniform draws"), ("strat+anti", "stratified t + antithetic noise")):
        tg = b.train_grads(draws=draws)
        qg = {t: b.query_grads(t, draws=draws) for t in ("loss", "elbo")}
        curv = b.curvature("expand", "mc", draws=draws)
        methods = ("kfac", "ekfac") if draws == "uniform" else ("ekfac",)
        for method in methods:
            for t in ("loss", "elbo"):
                (mode, d), r = best(b.sweep(curv, qg[t], tg, t, method, modes=("absolute",)), "absolute")
                name = f"{'EK-FAC' if method == 'ekfac' else 'K-FAC'} expand MC, {label} (tuned abs. damping)"
                main[t][name] = (r, f"{mode} {d:g}")
                scores[t][name] = b.influence(b.variant(curv, method, d, mode), qg[t], tg)
        if draws == "uniform":
            uniform = (qg, tg)
    base = baseline_rows(b, main, *uniform)
    for t in main:
        scores[t].update(base[t])
        main[t]["Oracle (retraining, seed vs mean of other seeds)"] = (run.oracle(gt[t]), "")

    train_labels, qlabels = b.train_data[1], q["labels"]
    frac = {name: same_class_fraction(sc, qlabels, train_labels, k) for name, sc in scores["loss"].items()}
    chance = next(iter(frac.values()))["chance"]
    P("### Class-conditional LDS (%) by method and measurement target, with the same-class fraction of the top "
      f"{k} influences (loss target)")
    P("")
    P(f"| method | LDS loss | LDS ELBO | top-{k} positive same class | top-{k} negative same class | "
      "setting (loss / ELBO) |")
    P("|---|---|---|---|---|---|")
    for name in main["loss"]:
        f = frac.get(name)
        ftxt = f"{100 * f['positive']:.1f}% | {100 * f['negative']:.1f}%" if f else "— | —"
        P(f"| {name} | {fmt(main['loss'][name][0])} | {fmt(main['elbo'][name][0])} | {ftxt} | "
          f"{main['loss'][name][1]} / {main['elbo'][name][1]} |")
    P("")
    P(f"Same-class chance rate (fraction of the N = {len(train_labels)} training digits sharing the query's class, "
      f"averaged over the {len(qlabels)} queries): {100 * chance:.1f}%.")
    P("")

    # paired differences over the queries: each EK-FAC row minus the best baseline of each target
    diffs = {}
    P("### Paired differences over the queries (LDS points): EK-FAC minus the best baseline per target")
    P("")
    P("| comparison | loss | ELBO |")
    P("|---|---|---|")
    baselines = [n for n in base["loss"]]
    top = {t: max(baselines, key=lambda n: main[t][n][0].mean) for t in main}
    ekfac_rows = [n for n in main["loss"] if n.startswith("EK-FAC")]
    for name in ekfac_rows:
        cells = []
        for t in ("loss", "elbo"):
            d = paired_difference(main[t][name][0], main[t][top[t]][0])
            diffs[f"{name} - {top[t]} ({t})"] = [d.mean, d.sem]
            cells.append(f"{fmt(d)} (vs {top[t].split(' (')[0]})")
        P(f"| {name.split(' (')[0]} | " + " | ".join(cells) + " |")
    d = paired_difference(main["loss"][ekfac_rows[1]][0], main["loss"][ekfac_rows[0]][0])
    e = paired_difference(main["elbo"][ekfac_rows[1]][0], main["elbo"][ekfac_rows[0]][0])
    diffs["stratified+antithetic - uniform draws"] = {"loss": [d.mean, d.sem], "elbo": [e.mean, e.sem]}
    P(f"| EK-FAC stratified + antithetic minus uniform draws | {fmt(d)} | {fmt(e)} |")
    P("")

    # Figure 4 analogue: expand / reduce x MC / empirical Fisher, K-FAC / EK-FAC (loss target, best abs. damping)
    qg, tg = uniform
    abl = {}
    P("### Ablation (loss target; best absolute damping of the grid per cell; uniform draws)")
    P("")
    P("| approx | Fisher | K-FAC | EK-FAC |")
    P("|---|---|---|---|")
    for approx in ("expand", "reduce"):
        for fisher in ("mc", "empirical"):
            curv = b.curvature(approx, fisher)
            cells = []
            for method in ("kfac", "ekfac"):
                (_, dd), r = best(b.sweep(curv, qg["loss"], tg, "loss", method, modes=("absolute",)), "absolute")
                abl[f"{approx} {fisher} {method}"] = [r.mean, r.sem, dd]
                cells.append(f"{fmt(r)} (λ={dd:g})")
            P(f"| {approx} | {fisher} | " + " | ".join(cells) + " |")
    P("")
    res = {"settings": dataclasses.asdict(S), "paired_differences": diffs, "ablation_loss": abl,
           "main": {t: {n: [v[0].mean, v[0].sem, v[1]] for n, v in main[t].items()} for t in main},
           "per_query": {t: {n: v[0].per_query.tolist() for n, v in main[t].items()} for t in main},
           "same_class_top_k": {"k": k, "chance": chance, "methods": frac},
           "query_labels": qlabels.tolist(), "times": b.times, "methods_wall_s": time.time() - t_start}
    (root / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (root / "tables.md").write_text("\n".join(lines) + "\n")
    print(f"methods done in {time.time() - t_start:.0f} s", flush=True)
    return res


def go_past(b: Bench, abl, qg, tg, P):
    """Variants of EK-FAC expand MC measured against it on the loss target (paired differences over queries)."""
    base_sweep = abl[("expand", "mc", "ekfac", "loss")]
    (bm, bd), base = best(base_sweep, "absolute")
    fixed_key = ("absolute", bd)
    rows = []

    def add(name, sweep_or_result, note=""):
        if isinstance(sweep_or_result, dict):
            (m, d), r = best(sweep_or_result, "absolute")
            at_fixed = sweep_or_result.get(fixed_key)
            label = f"abs {d:g}"
        else:
            r, at_fixed, label = sweep_or_result, None, note
        diff = paired_difference(r, base)
        dfix = paired_difference(at_fixed, base_sweep[fixed_key]) if at_fixed is not None else None
        rows.append((name, r, diff, dfix, label))

    add("EK-FAC expand MC, uniform draws (reference)", base_sweep)
    # relative damping
    (rm, rd), rr = best(base_sweep, "relative")
    add("per-layer relative damping", rr, f"rel {rd:g}")
    # shared draws between query and train gradients
    qs = b.query_grads("loss", tag="_shared", share_draws=True)
    curv = b.curvature("expand", "mc")
    add("shared query/train draws", b.sweep(curv, qs, tg, "loss", modes=("absolute",)))
    # timestep reweighting of the query measurement
    T = 1000
    tt = torch.arange(T, dtype=torch.float64)
    weightings = {"lo": ("t < 500 only", (tt < 500).double()), "hi": ("t >= 500 only", (tt >= 500).double()),
                  "lin": ("w(t) = 1 - t/T", 1 - tt / T),
                  "sig": ("w(t) = sqrt(1 - abar_t)", (1 - b.sch.alphas_cumprod.double()).sqrt())}
    for key, (wname, w) in weightings.items():
        tag = "_w" + key
        qw = b.query_grads("weighted_loss", tag=tag, timestep_weights=w.tolist())
        add(f"query timestep reweighting: {wname}", b.sweep(curv, qw, tg, "loss", modes=("absolute",)))
    # stratified timesteps / antithetic noise (fit, train and query draws)
    for draws in ("strat", "anti", "strat+anti"):
        c = b.curvature("expand", "mc", draws=draws)
        add(f"draws: {draws}", b.sweep(c, b.query_grads("loss", draws=draws), b.train_grads(draws=draws), "loss",
                                       modes=("absolute",)))
    # checkpoint ensembling: average of the EK-FAC scores of EMA checkpoints (normalised per query)
    ens = []
    for s in b.S.checkpoints[-3:]:
        key = "final" if s == b.S.steps else f"ema@{s}"
        c = b.variant(b.curvature("expand", "mc", model_key=key), "ekfac", bd, "absolute")
        sc = b.influence(c, b.query_grads("loss", model_key=key), b.train_grads(model_key=key)).double()
        ens.append(sc / sc.std(dim=1, keepdim=True))
    add(f"checkpoint ensemble (EMA at {b.S.checkpoints[-3:]}, 3x compute)", b.lds(sum(ens), "loss"), f"abs {bd:g}")

    P("### Going past the paper (loss target; EK-FAC expand MC; paired differences over the 32 queries)")
    P("")
    P("| variant | LDS | Δ vs reference (best damping each) | Δ at the reference's damping | damping |")
    P("|---|---|---|---|---|")
    out = {}
    for name, r, diff, dfix, label in rows:
        dtxt = fmt(diff) if name != rows[0][0] else "—"
        ftxt = fmt(dfix) if dfix is not None and name != rows[0][0] else "—"
        P(f"| {name} | {fmt(r)} | {dtxt} | {ftxt} | {label} |")
        out[name] = [r.mean, r.sem, diff.mean, diff.sem, label]
    P("")
    return out


def precompute(root: Path, S, images, q):
    """Every gradient, fit and baseline pass of ``run_methods`` (cached), without the LDS ground truth: can run
    while the retraining is still going."""
    import lds_digits as LD
    b = Bench(root, S, images, q, None, None,
              lambda steps=None, raw=False: LD.full_model(root, images, steps=steps, raw=raw))
    b.train_grads()
    for t in ("loss", "elbo"):
        b.query_grads(t)
    for approx in ("expand",) if b.condition else ("expand", "reduce"):
        for fisher in ("mc",) if b.condition else ("mc", "empirical"):
            b.curvature(approx, fisher)
    model = b.model("final")
    b.cached("dtrak_features", lambda: dict(zip(("s", "phi", "psi"), trak_scores(
        model, dtrak_task(b), b.query_data, b.train_data, TRAKConfig(), draws_per_forward=BATCH,
        return_features=True))))
    journey_trak(b, model)
    tracin(b)
    if b.condition:  # the conditional run's table needs only these and the stratified + antithetic variant
        b.curvature("expand", "mc", draws="strat+anti")
        b.query_grads("loss", draws="strat+anti")
        b.query_grads("elbo", draws="strat+anti")
        b.train_grads(draws="strat+anti")
        print("precompute done", flush=True)
        return
    b.query_grads("loss", tag="_shared", share_draws=True)
    for draws in ("strat", "anti", "strat+anti"):
        b.curvature("expand", "mc", draws=draws)
        b.query_grads("loss", draws=draws)
        b.train_grads(draws=draws)
    for s in S.checkpoints[-3:-1]:
        key = f"ema@{s}"
        b.curvature("expand", "mc", model_key=key)
        b.query_grads("loss", model_key=key)
        b.train_grads(model_key=key)
    print("precompute done", flush=True)


def draw_seed_check(root: Path, S, images, q, run, gt, seeds=(1,)):
    """EK-FAC expand MC (loss target) with uniform, antithetic and stratified+antithetic draws, per draw seed, with
    the damping rule of ``go_past``: each method at its best absolute damping of the grid; paired differences over
    the queries vs the uniform reference (and vs pixel cosine). Seed 1 reuses the original run's cache."""
    import lds_digits as LD
    pix = embedding_similarity(q["images"], images)
    out = {}
    for ds in seeds:
        t0 = time.time()
        b = Bench(root, S, images, q, run, gt,
                  lambda steps=None, raw=False: LD.full_model(root, images, steps=steps, raw=raw), draw_seed=ds)
        pix_r = b.lds(pix, "loss")
        rows = {}
        for draws in ("uniform", "anti", "strat+anti"):
            c = b.curvature("expand", "mc", draws=draws)
            sw = b.sweep(c, b.query_grads("loss", draws=draws), b.train_grads(draws=draws), "loss",
                         modes=("absolute",))
            (_, d), r = best(sw, "absolute")
            rows[draws] = (sw, d, r)
        base_sw, bd, base = rows["uniform"]
        res = {}
        for draws, (sw, d, r) in rows.items():
            diff = paired_difference(r, base)
            dfix = paired_difference(sw[("absolute", bd)], base_sw[("absolute", bd)])
            dpix = paired_difference(r, pix_r)
            res[draws] = {"lds": [r.mean, r.sem], "damping": d, "diff": [diff.mean, diff.sem],
                          "diff_at_ref_damping": [dfix.mean, dfix.sem], "diff_vs_pixel": [dpix.mean, dpix.sem]}
            print(f"seed {ds} {draws:10s} LDS {fmt(r)} (abs {d:g})  vs uniform {fmt(diff)}  "
                  f"(at ref damping {fmt(dfix)})  vs pixel {fmt(dpix)}", flush=True)
        res["pixel"] = [pix_r.mean, pix_r.sem]
        res["wall_s"] = time.time() - t0
        out[ds] = res
        (root / "draw_seed_check.json").write_text(json.dumps(out, indent=1, default=str))
        print(f"seed {ds} done in {res['wall_s']:.0f} s", flush=True)
    return out
