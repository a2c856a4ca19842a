"""The stage bodies: ``body(ctx, d, checkpoints) -> produced``. A body writes its outputs (``layout.OUTPUTS``)
into ``d`` (the runner's staging folder, swapped into place when the body returns), keeps resumable state in
``checkpoints`` (resuming from what a previous, interrupted run of the same fingerprint and inputs left there), and
returns the identity of what it produced (model weights, queries, curvature values, scores; recorded in
``stage.json`` and compared by the stages that read it).

A body assumes its dependencies are done (the runner checks). The fit and score stages checkpoint every
``RunConfig.checkpoint_seconds`` seconds and on SIGINT / SIGTERM (at the end of the current group); the encode stage
saves its partial latents as often, the vae and train stages every ``checkpoint_every`` steps.

Latent runs (``RunContext.latent``) add two stages before train: ``vae`` trains a VAE preset and ``encode``
encodes the training images once into ``latents.safetensors``; train, fit and score then see the latents
(``RunContext.examples``) and the sample stage generates latents and decodes them for the figures and the report.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

import torch

from ..curvature import fit_curvature
from ..diffusion.models import save_pipeline
from ..diffusion.sampling import ddpm_sample
from ..diffusion.training import train as train_model
from ..diffusion.vae import build_vae, save_vae, train_vae
from ..engine import CheckpointMismatch
from ..latents import LatentsMismatch, decode_latents, encode_latents
from ..report.figures import samples_figure
from ..report.writer import write_report
from ..identity import tensors_fingerprint
from ..scoring import pairwise_scores
from ..storage import atomic_write_json, model_fingerprint, save_tensors
from .context import RunContext
from .fingerprints import needs_trajectory
from .layout import StageError
from .settings import to_dict

__all__ = ["BODIES", "SCORE_CONVENTION"]

SCORE_CONVENTION = ("S[q, n] > 0: removing training example n is predicted to raise the query's measurement "
                    "(for loss: make the query less likely)")


def query_names(seeds, labels=None, prompts=None) -> list:
    """A name per query for outputs meant for people: ``query_000 (seed 10000)``, ``query_000 (seed 10000,
    class 3)`` for a query generated for class 3, ``query_000 (seed 10000, prompt "a red car")`` for one generated
    for that prompt."""
    return [f"query_{q:03d} (seed {int(s)}" + ("" if labels is None else f", class {int(labels[q])}")
            + ("" if prompts is None else f', prompt "{prompts[q]}"') + ")" for q, s in enumerate(seeds)]


def class_names(data, k: int) -> tuple:
    """The names of the data's K classes (the folder names, the digits), else "0".."K-1"."""
    return tuple(data.class_names) if data.class_names else tuple(str(c) for c in range(k))


def vae(ctx: RunContext, d: str, checkpoints: str) -> str:
    """Train the run's VAE preset on the training images (``diffusion.vae.train_vae``: seeded, resumable, its
    ``scaling_factor`` set to give unit-variance latents); write ``vae/`` (a diffusers ``AutoencoderKL`` folder)
    and ``losses.json``. Produces: the VAE weights' fingerprint."""
    data = ctx.data()
    c, h, _ = data.shape
    model = build_vae(ctx.config.model.spec, seed=ctx.config.model.seed, in_channels=c, sample_size=h)
    result = train_vae(model, data.images, ctx.config.vae, checkpoint_dir=checkpoints, progress=ctx.progress,
                       device=ctx.device)
    trained = result.vae.cpu()
    save_vae(trained, os.path.join(d, "vae"))
    atomic_write_json(os.path.join(d, "losses.json"), {
        "resumed_from": result.resumed_from, "scaling_factor": result.scaling_factor,
        "columns": ["reconstruction MSE per pixel", "KL per pixel"], "losses": result.losses})
    if result.losses:
        tail = [r for r, _ in result.losses[-min(100, len(result.losses)):]]
        ctx.log(f"[vae] mean reconstruction MSE of the last {len(tail)} steps: {sum(tail) / len(tail):.4f}; "
                f"scaling factor {result.scaling_factor:.4f}")
    return model_fingerprint(trained.named_parameters())["values"]


def encode(ctx: RunContext, d: str, checkpoints: str) -> str:
    """Encode the training images once with the run's fixed VAE: ``z = scaling_factor * E(x).mean``
    (deterministic: the latent mean, no sample; ``kfac_influence.latents.encode_latents``), ``vae.encode_batch_size``
    images at a time; write ``latents.safetensors`` (latents ``(N, c, h, w)``; its header records the identities of
    the VAE's weights and of the images). The partial file lives in ``checkpoints`` (saved every
    ``checkpoint_seconds``), so an interrupted encoding resumes from its last saved batch and writes the same
    bytes. Produces: the latents' fingerprint."""
    partial = os.path.join(checkpoints, "latents.safetensors")
    try:
        z = encode_latents(ctx.vae(), ctx.data().images, partial, batch_size=ctx.config.vae.encode_batch_size,
                           seconds=ctx.config.checkpoint_seconds, progress=ctx.progress)
    except LatentsMismatch as exc:  # a partial file of other inputs: the runner starts over once
        raise CheckpointMismatch(str(exc)) from None
    if not bool(torch.isfinite(z).all()):
        raise StageError("the VAE's latents of the training images hold NaN or infinite values; the VAE is unusable")
    os.replace(partial, os.path.join(d, "latents.safetensors"))
    return tensors_fingerprint([z])


def train(ctx: RunContext, d: str, checkpoints: str) -> str:
    """Train the initial model; write the EMA model (``pipeline/``) and the losses. Produces: the EMA weights'
    fingerprint. A latent run trains on the latents and saves its VAE in ``pipeline/vae/`` (a latent pipeline
    folder, which ``--model`` loads)."""
    ctx.check_condition()
    model, scheduler = ctx.initial_model()
    model.to(ctx.device)
    cond = {"labels": ctx.data().labels, "null_label": ctx.null_label()} if ctx.conditional else {}
    if ctx.text_conditional:  # each image under its caption's embeddings; dropout: the empty prompt's
        null = ctx.text().null()
        cond = {"condition": ctx.text().train().as_condition(),
                "null_condition": None if null is None else null.as_condition()}
    result = train_model(model, scheduler, ctx.examples(), ctx.config.train, checkpoint_dir=checkpoints,
                         progress=ctx.progress, device=ctx.device, **cond)
    ema = result.model.cpu()
    save_pipeline(ema, scheduler, os.path.join(d, "pipeline"), vae=ctx.vae() if ctx.latent else None)
    atomic_write_json(os.path.join(d, "losses.json"), {"resumed_from": result.resumed_from,
                                                       "losses": result.losses})
    if result.losses:
        tail = result.losses[-min(100, len(result.losses)):]
        ctx.log(f"[train] mean loss of the last {len(tail)} steps: {sum(tail) / len(tail):.4f}")
    return model_fingerprint(ema.named_parameters())["values"]


def sample(ctx: RunContext, d: str, checkpoints: str) -> str:
    """Generate the queries; write ``samples.safetensors`` (with the queries' names; in a class-conditional run
    also ``labels`` (Q,): query k is generated for class ``k % K``, with the sample settings' guidance scale) and
    ``samples.png``. Produces: the samples' fingerprint. A latent run generates latents (``latents`` (Q, c, h, w),
    not clamped: the queries) and stores them decoded by its VAE as ``images`` (Q, C, H, W) for people."""
    model, scheduler = ctx.trained()
    s = ctx.config.sample
    cond, header = {}, {}
    if ctx.conditional:
        ctx.check_condition()
        k = ctx.num_classes()
        cond = {"class_labels": torch.arange(s.num_queries, dtype=torch.long) % k,
                "guidance_scale": s.guidance_scale, "null_label": ctx.null_label()}
        header = {"class_names": list(class_names(ctx.data(), k)), "null_label": ctx.null_label()}
    elif ctx.text_conditional:  # query k for prompt k % P; guidance against the empty prompt
        ctx.check_condition()
        text, null = ctx.text(), ctx.text().null()
        cond = {"condition": text.queries().as_condition(), "guidance_scale": s.guidance_scale,
                "null_condition": None if null is None else null.as_condition()}
        header = {"prompts": list(text.prompts)}
    res = ddpm_sample(model, scheduler, s.num_queries, ctx.input_shape(), seed=s.seed, batch_size=s.batch_size,
                      num_inference_steps=s.num_inference_steps, record_trajectory=needs_trajectory(ctx.config),
                      progress=ctx.progress, device=ctx.device, clamp=not ctx.latent, **cond)
    tensors = {"images": res.images, "seeds": res.seeds, "timesteps": res.timesteps}
    if ctx.latent:  # the queries are the latents; their decoded images are for the figures and the report
        tensors["latents"] = res.images
        tensors["images"] = decode_latents(ctx.vae(), res.images, batch_size=s.batch_size).float().clamp(-1, 1).cpu()
    if res.trajectory is not None:
        tensors["trajectory"] = res.trajectory
    if res.labels is not None:
        tensors["labels"] = res.labels
    save_tensors(os.path.join(d, "samples.safetensors"), tensors,
                 {"kind": "samples", "settings": to_dict(s),
                  "query_names": query_names(res.seeds, res.labels, header.get("prompts")), **header})
    samples_figure(os.path.join(d, "samples.png"), tensors["images"],
                   [f"q{i} s{int(x)}" + ("" if res.labels is None else f" c{int(res.labels[i])}")
                    + ("" if "prompts" not in header else f" {header['prompts'][i][:14]}")
                    for i, x in enumerate(res.seeds)])
    return tensors_fingerprint([tensors, *([header["prompts"]] if "prompts" in header else [])])


def fit(ctx: RunContext, d: str, checkpoints: str) -> str:
    """Fit the curvature of the training loss on the EMA model; write ``curvature.safetensors``. Produces: the
    curvature values' fingerprint."""
    model, _ = ctx.trained()
    f = ctx.config.fit
    task = ctx.task()
    # under --max-memory the fit plans itself (memory.plan_fit: draws per forward and, when the state does not
    # fit, layer partitions, one pair of data passes each)
    try:
        curvature = fit_curvature(model, task, ctx.train_data(), f.curvature, draws_per_forward=f.draws_per_forward,
                                  checkpoint_dir=checkpoints, progress=ctx.progress,
                                  model_mode=ctx.config.model_mode, checkpoint_seconds=ctx.config.checkpoint_seconds,
                                  max_memory=ctx.config.max_memory)
    except MemoryError as exc:
        raise StageError(f"--max-memory {ctx.config.max_memory}: {exc}") from None
    curvature.save(os.path.join(d, "curvature.safetensors"))
    return curvature.values_fingerprint()


def score(ctx: RunContext, d: str, checkpoints: str) -> str:
    """Score every query against every training example at the score settings' damping; write
    ``scores.safetensors`` (scores (Q, N) float32, train_ids (N,), query_ids (Q,); the header names every
    training image (``train_names``: file names) and query (``query_names``)). Produces: the scores'
    fingerprint."""
    model, _ = ctx.trained()
    curvature = ctx.curvature(model)
    samples = ctx.samples()
    sc = ctx.config.score
    trajectories = sc.measurement == "sampling_trajectory_logprob"
    if ctx.latent and "latents" not in samples:
        raise StageError("the samples hold no latents (generated by a pixel-space run?); rerun the sample stage "
                         "with --force")
    # a latent run's queries are the generated latents (its trajectories are latent too), never the decoded images
    queries = samples["trajectory"] if trajectories else samples["latents" if ctx.latent else "images"]
    task = ctx.task(trajectory_timesteps=samples["timesteps"].tolist() if trajectories else None)
    data = ctx.data()
    draws, query_batch = ctx.score_plan(model, task, sc.draws_per_forward, num_queries=len(queries),
                                        num_examples=len(data.images))
    query_data = queries.to(ctx.device)
    if ctx.conditional:
        if "labels" not in samples:
            raise StageError("the samples have no labels (generated by an unconditional run?); rerun the sample "
                             "stage with --force")
        query_data = (query_data, samples["labels"].to(ctx.device))  # each query under its own class
    elif ctx.text_conditional:  # each query under its own prompt's embeddings
        if samples.get("prompts") != list(ctx.text().prompts):
            raise StageError("the samples were generated for other prompts (or by a run without text); rerun the "
                             "sample stage with --force")
        query_data = ctx.text().queries().as_data(query_data)
    scores = pairwise_scores(model, task, curvature, query_data, ctx.train_data(), draws_per_forward=draws,
                             damping=sc.damping, damping_mode=sc.damping_mode, progress=ctx.progress,
                             model_mode=ctx.config.model_mode, checkpoint_dir=checkpoints,
                             checkpoint_seconds=ctx.config.checkpoint_seconds, query_batch=query_batch)
    scores = scores.float().cpu()
    if not torch.isfinite(scores).all():
        raise StageError("scores contain NaN or infinite values (try a larger --damping)")
    save_tensors(os.path.join(d, "scores.safetensors"),
                 {"scores": scores, "train_ids": data.ids, "query_ids": samples["seeds"]},
                 {"kind": "scores", "measurement": sc.measurement, "settings": to_dict(sc),
                  "curvature": ctx.curvature_path(), "convention": SCORE_CONVENTION,
                  "train_names": list(data.names()),
                  "query_names": query_names(samples["seeds"], samples.get("labels"), samples.get("prompts"))})
    return tensors_fingerprint([scores])


def report(ctx: RunContext, d: str, checkpoints: str) -> None:
    """Write the visual report (PNGs, ``report.md``, ``report.json``) into ``d``, linking files as seen from the
    run's ``report/`` folder."""
    write_report(d, ctx.scores(), ctx.samples(), ctx.data(), ctx.config, ctx.out,
                 link_dir=os.path.join(ctx.out, "report"))


BODIES: Dict[str, Callable[[RunContext, str, str], object]] = {
    "vae": vae, "encode": encode,
    "train": train, "sample": sample, "fit": fit, "score": score, "report": report}
