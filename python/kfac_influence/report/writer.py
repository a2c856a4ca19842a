"""The report folder: per-query PNGs, a summary grid, ``report.json`` (numbers) and ``report.md`` linking it all."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..storage import atomic_write_json, atomic_write_text
from .classes import PixelClassifier, class_match
from .figures import query_figure, samples_figure, signed_top, summary_figure

__all__ = ["write_report"]


def _rel(path: str, start: str) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def _class_name(c: int, names) -> str:
    return str(names[c]) if names and 0 <= c < len(names) else str(c)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def write_report(report_dir: str, scores: dict, samples: dict, data, settings, run_dir: Optional[str] = None,
                 link_dir: Optional[str] = None) -> dict:
    """Write the report of one run into ``report_dir``.

    scores: ``{"scores": (Q, N), "train_ids": (N,), "query_ids": (Q,), "meta": {...}}``; samples: ``{"images":
    (Q, C, H, W), "seeds": (Q,)}``; data: the training ``ImageDataset`` (its ids must equal ``train_ids``);
    settings: the run's ``kfac_influence.app.RunConfig``; link_dir: the folder the report will be read from
    (default ``report_dir``; the pipeline writes into a staging folder and moves the files there), which relative
    links start from. Returns the summary written to ``report.json``.

    Class-conditional runs (``samples["labels"]``: the class each query was generated for): every query is titled
    with its class, ``query_conditions`` maps query id to class, and ``class_match`` (the fraction of each query's
    top-k positive / negative scores whose training label equals the query's class, ``exact: true``) is measured
    from the labels; otherwise, for labelled data, from a pixel classifier's guess (``exact: false``).

    Text-conditional runs (``samples["prompts"]``: Q strings, the prompt each query was generated for): every
    query is titled with its prompt (shortened in figures), ``query_conditions`` maps query id to ``{"prompt":
    ...}``, and ``train_captions`` maps the id of every training example in a top list to its caption.

    ``top_positive`` / ``top_negative`` list, per query, up to ``top_k`` ``[id, file name, score]`` entries with a
    strictly positive / negative score (fewer when fewer scores have that sign).
    """
    os.makedirs(report_dir, exist_ok=True)
    link_dir = link_dir or report_dir
    run_dir = run_dir or os.path.dirname(os.path.abspath(link_dir))
    S = scores["scores"].float()
    ids = scores["train_ids"]
    if not torch.equal(ids, data.ids):
        raise ValueError("the training ids of the scores do not match the training data (settings changed?)")
    train_names = data.names()
    recorded_names = scores.get("meta", {}).get("train_names")
    if recorded_names is not None and list(recorded_names) != list(train_names):
        raise ValueError("the training file names of the scores do not match the training data (files renamed, "
                         "added or removed?); rerun the score stage")
    queries = samples["images"]
    Q, N = S.shape
    k = min(settings.report.top_k, N)
    labels = data.labels
    names = data.class_names

    summary = {"num_queries": Q, "num_train": N, "top_k": k, "measurement": scores.get("meta", {}).get("measurement"),
               "score_stats": {"min": float(S.min()), "max": float(S.max()), "mean": float(S.mean()),
                               "std": float(S.std()) if S.numel() > 1 else 0.0},
               "top_positive": {}, "top_negative": {},
               "top_lists": "[id, file name, score]; only scores > 0 (positive) / < 0 (negative), so fewer than "
                            "top_k where fewer scores have that sign"}
    qlabels = None
    conditions = samples.get("labels")
    if conditions is not None:  # class-conditional run: each query's class is the one it was generated for
        if labels is None:
            raise ValueError("the queries carry class labels but the training data has none (settings changed?)")
        qlabels = conditions.long()
        cm = class_match(S, labels, qlabels, k)
        summary["class_match"] = {
            "k": cm.k, "top_positive_same_class": cm.positive, "top_negative_same_class": cm.negative,
            "chance": cm.chance, "exact": True,
            "classifier": None, "source": "each query's condition (the class it was generated for); no classifier",
            "query_classes": qlabels.tolist(),
            "per_query_positive": [round(float(v), 4) for v in cm.per_query],
        }
        summary["query_conditions"] = {int(scores["query_ids"][q]): {"class": int(qlabels[q]),
                                                                     "name": _class_name(int(qlabels[q]), names)}
                                       for q in range(Q)}
        summary["guidance_scale"] = settings.sample.guidance_scale
    elif labels is not None and labels.unique().numel() > 1:
        clf = PixelClassifier(seed=0).fit(data.images, labels)
        qlabels, conf = clf.predict(queries)
        cm = class_match(S, labels, qlabels, k)
        summary["class_match"] = {
            "k": cm.k, "top_positive_same_class": cm.positive, "top_negative_same_class": cm.negative,
            "chance": cm.chance, "classifier": "logistic regression on training pixels",
            "classifier_train_accuracy": clf.train_accuracy,
            "exact": False, "query_classes": qlabels.tolist(),
            "query_class_confidence": [round(float(c), 4) for c in conf],
            "per_query_positive": [round(float(v), 4) for v in cm.per_query],
        }
    prompts = samples.get("prompts")
    if prompts is not None:  # text-conditional run: each query's prompt is its condition
        if len(prompts) != Q:
            raise ValueError(f"the samples name {len(prompts)} prompts for {Q} queries; rerun the sample stage")
        summary["query_conditions"] = {int(scores["query_ids"][q]): {"prompt": prompts[q]} for q in range(Q)}
        summary["guidance_scale"] = settings.sample.guidance_scale
    for q in range(Q):
        pos, neg = signed_top(S[q], k)
        summary["top_positive"][int(scores["query_ids"][q])] = [
            [int(ids[n]), train_names[n], float(S[q, n])] for n in pos]
        summary["top_negative"][int(scores["query_ids"][q])] = [
            [int(ids[n]), train_names[n], float(S[q, n])] for n in neg]

    captions = getattr(data, "captions", None)
    if captions is not None:
        shown = {n for q in summary["top_positive"] for n in (e[0] for e in summary["top_positive"][q])}
        shown |= {n for q in summary["top_negative"] for n in (e[0] for e in summary["top_negative"][q])}
        where = {int(i): j for j, i in enumerate(ids.tolist())}
        summary["train_captions"] = {n: captions[where[n]] for n in sorted(shown)}

    def title(q: int, width: int = 24) -> str:
        t = f"query {q}"
        if qlabels is not None:
            c = _class_name(int(qlabels[q]), names)
            t += f" [class {c}]" if conditions is not None else f" [{c}]"
        if prompts is not None:
            t += f' "{_clip(prompts[q], width)}"'
        return t

    per_query = []
    nfig = min(Q, settings.report.max_query_figures)
    for q in range(nfig):
        name = f"query_{q:03d}.png"
        query_figure(os.path.join(report_dir, name), queries[q], title(q) + f"\nseed {int(samples['seeds'][q])}",
                     S[q], data.images, ids, k, labels, names)
        per_query.append(name)
    rows = min(Q, settings.report.summary_rows)
    summary_figure(os.path.join(report_dir, "summary.png"), queries[:rows], [title(q) for q in range(rows)],
                   S[:rows], data.images, ids, k, labels, names)
    samples_figure(os.path.join(report_dir, "queries.png"), queries, [title(q) for q in range(Q)])
    if "latents" in samples:  # a latent run: the UNet saw latents; the queries are shown decoded
        summary["latent"] = {"latent_shape": list(samples["latents"].shape[1:]),
                             "queries_shown": "decoded by the run's fixed VAE"}
    atomic_write_json(os.path.join(report_dir, "report.json"), summary)

    scores_path = os.path.join(run_dir, "scores", "scores.safetensors")
    s = settings
    c = s.fit.curvature
    lines = [
        "# Influence report",
        "",
        f"{Q} generated images (queries) attributed to {N} training examples ({s.data.source}, images "
        f"{'x'.join(str(v) for v in data.shape)}) with {c.method.upper()} ({c.approx}, {c.fisher} "
        f"Fisher, damping {s.score.damping:g} {s.score.damping_mode}) on the EMA weights of `{s.model.spec}` "
        f"(model mode `{s.model_mode}`).",
        f"Measurement: `{s.score.measurement}`, {s.score.num_query_draws} draws per query, "
        f"{s.score.num_train_draws} per training example.",
        "",
        "**Sign convention.** A positive score means removing that training example is predicted to *raise* the "
        "query's measurement, i.e. (for the loss) the example made the generated image *more likely*. "
        "Green frames: top positive (raised the query's likelihood); red frames: top negative (lowered it). "
        "Each column shows only scores of its sign, so it holds fewer than "
        f"{k} images where fewer training examples have that sign.",
        "",
    ]
    if conditions is not None:
        lines[2:2] = [
            f"Class-conditional model: query k was generated for class k mod K (guidance scale "
            f"{settings.sample.guidance_scale:g}; 1: none) and is attributed under that class; each training "
            "example under its own label.",
            "",
        ]
    if prompts is not None:
        lines[2:2] = [
            f"Text-conditional model: query k was generated for prompt k mod P (guidance scale "
            f"{settings.sample.guidance_scale:g} against the empty prompt; 1: none) and is attributed under that "
            "prompt's token embeddings; each training example under its caption's. The captions of the training "
            "examples shown are in report.json (`train_captions`).",
            "",
        ]
    if "latent" in summary:
        lines[2:2] = [
            "Latent diffusion: the UNet was trained, fitted and scored on the training images' VAE latents ("
            + "x".join(str(v) for v in summary["latent"]["latent_shape"]) + ", the latent mean times the VAE's "
            "scaling factor); each query is a generated latent, shown decoded by the fixed VAE, which is not "
            "attributed (no tracked layer). Training images are shown as they are.",
            "",
        ]
    if "class_match" in summary:
        cm = summary["class_match"]
        how = ("Each generated image's class is its condition (the class it was generated for), so the fraction is "
               "exact: no classifier." if cm["exact"] else
               "Each generated image is labelled by a logistic-regression classifier trained on the training "
               f"pixels (training accuracy {cm['classifier_train_accuracy']:.3f}).")
        lines += [
            "## Do the top influences share the query's class?",
            "",
            how,
            "",
            "| training examples | fraction with the query's class |",
            "|---|---|",
            f"| top {k} positive | **{cm['top_positive_same_class']:.3f}** |",
            f"| top {k} negative | {cm['top_negative_same_class']:.3f} |",
            f"| random (chance) | {cm['chance']:.3f} |",
            "",
        ]
    lines += [
        "## Summary",
        "",
        f"![summary](summary.png)",
        "",
        f"All queries: [queries.png](queries.png)",
        "",
        "## Per query",
        "",
    ]
    lines += [f"- [{title(q, 200)}]({per_query[q]})" for q in range(nfig)]
    lines += [
        "",
        "## Files",
        "",
        f"- scores (Q x N float32, `train_ids`, `query_ids`): [{_rel(scores_path, link_dir)}]"
        f"({_rel(scores_path, link_dir)})",
        f"- numbers of this report: [report.json](report.json)",
        f"- every setting, version and seed: [run.json]({_rel(os.path.join(run_dir, 'run.json'), link_dir)})",
        f"- generated queries: [{_rel(os.path.join(run_dir, 'samples', 'samples.safetensors'), link_dir)}]"
        f"({_rel(os.path.join(run_dir, 'samples', 'samples.safetensors'), link_dir)})",
        f"- curvature: `{s.score.curvature or _rel(os.path.join(run_dir, 'fit', 'curvature.safetensors'), link_dir)}`",
        f"- model (EMA weights, diffusers DDPMPipeline folder): "
        f"`{_rel(os.path.join(run_dir, 'train', 'pipeline'), link_dir)}`",
        "",
        f"Score statistics: min {summary['score_stats']['min']:.4g}, max {summary['score_stats']['max']:.4g}, "
        f"mean {summary['score_stats']['mean']:.4g}, std {summary['score_stats']['std']:.4g}.",
        "",
    ]
    atomic_write_text(os.path.join(report_dir, "report.md"), "\n".join(lines))
    return summary
