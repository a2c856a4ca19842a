"""Conditional diffusion (class labels, token embeddings with a mask) through DiffusionTask(condition=...).

References, none of which goes through the task's conditioning: curvlinops 3.0.1 KFACLinearOperator and
EKFACLinearOperator on the conditional UNets (each draw one data point, the condition part of its input X); a dense float64 GGN solve with
autograd per-example gradients on a model whose only tracked layer makes K-FAC type-2 the exact GGN; explicit
per-example gradients of the UNets under the conditions indexed from the original tensors, preconditioned by a
dense solve of (A (x) G + lambda I). The draws of the references come from the unconditional twin of the task
(conditions must not change the (t, eps) draws).
"""
import pytest
import torch
from torch.utils.data import Dataset

from kfac_influence import CurvatureConfig, fit_curvature, pairwise_scores
from kfac_influence.tasks import Conditioning, DiffusionTask

import bruteforce as bf
from conditional_models import LabelNet, class_unet, text_unet
from helpers import scheduler, tiny_unet

F64 = torch.float64


def class_data(n, seed, num_classes=3, size=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g, dtype=F64) * 2 - 1, torch.randint(0, num_classes, (n,),
                                                                                        generator=g)


def text_data(n, seed, tokens=3, width=12, size=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g, dtype=F64) * 2 - 1
    emb = torch.randn(n, tokens, width, generator=g, dtype=F64)
    mask = torch.ones(n, tokens, dtype=torch.bool)
    mask[::2, -1] = False  # every other example pads its last token
    return x, emb, mask


class DictDataset(Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


# ---------------------------------------------------------------------------------------------------- draws / API

def test_draws_carry_each_examples_condition_example_major():
    sch = scheduler()
    x, y = class_data(5, 0)
    plain = DiffusionTask(sch, num_train_draws=3, seed=2)
    task = DiffusionTask(sch, num_train_draws=3, seed=2, condition="class")
    idx = torch.arange(5)
    ref = plain.draws(x, idx, "fit", num_draws=3, seed=4)
    for batch in ((x, y), DictDataset(image=x, class_label=y)):
        data = batch if isinstance(batch, tuple) else \
            torch.utils.data.default_collate([batch[i] for i in range(5)])
        rows = task.draws(data, idx, "fit", num_draws=3, seed=4)
        for k in ("x_t", "target", "t", "xi"):  # the condition changes no draw
            assert torch.equal(rows.data[k], ref.data[k])
        assert torch.equal(rows.data["class_labels"], y[rows.example])
        moved = rows.to(torch.device("cpu"), torch.float32)
        assert moved.data["class_labels"].dtype == torch.int64 and moved.data["x_t"].dtype == torch.float32

    x, emb, mask = text_data(4, 1)
    task = DiffusionTask(sch, num_query_draws=2, condition=Conditioning("text", embed_dim=12))
    rows = task.draws((x, emb, mask), torch.arange(4), "query", num_draws=2, seed=0)
    assert torch.equal(rows.data["encoder_hidden_states"], emb[rows.example])
    assert torch.equal(rows.data["encoder_attention_mask"], mask[rows.example])
    ds = DictDataset(image=x, encoder_hidden_states=emb, encoder_attention_mask=mask)
    collated = torch.utils.data.default_collate([ds[i] for i in range(4)])
    from_dict = task.draws(collated, torch.arange(4), "query", num_draws=2, seed=0)
    assert all(torch.equal(from_dict.data[k], rows.data[k]) for k in rows.data) and from_dict.data.keys() == \
        rows.data.keys()
    rows = task.draws((x, emb), torch.arange(4), "query", num_draws=2, seed=0)
    assert "encoder_attention_mask" not in rows.data
    # unconditional: items after the images are ignored, as before conditioning existed
    assert torch.equal(plain.draws((x, emb), torch.arange(4), "fit", num_draws=2, seed=0).data["x_t"],
                       plain.draws(x, torch.arange(4), "fit", num_draws=2, seed=0).data["x_t"])


def test_trajectory_queries_carry_their_condition():
    sch = scheduler(T=20)
    model = class_unet()
    task = DiffusionTask(sch, measurement="sampling_trajectory_logprob", condition="class")
    traj = torch.randn(2, 5, 1, 4, 4, dtype=F64)
    labels = torch.tensor([2, 0])
    rows = task.draws((traj, labels), torch.arange(2), "query", num_draws=1, seed=0)
    assert torch.equal(rows.data["class_labels"], labels[rows.example])
    from kfac_influence.tasks.ddpm import transition
    mean = task.forward(model, rows)
    ref, _ = transition(model, sch, rows.data["x_in"], rows.data["t"], rows.data["prev_t"],
                        condition={"class_labels": labels[rows.example]})
    torch.testing.assert_close(mean, ref, rtol=0, atol=0)
    other, _ = transition(model, sch, rows.data["x_in"], rows.data["t"], rows.data["prev_t"],
                          condition={"class_labels": (labels[rows.example] + 1) % 3})
    assert (other - mean).abs().max() > 1e-6


def test_guided_epsilon_is_the_classifier_free_mixture():
    from kfac_influence.tasks.ddpm import epsilon, guided_epsilon

    model, (x, y) = class_unet(num_classes=4), class_data(3, 5)
    t = torch.tensor([5, 500, 900])
    c, null = {"class_labels": y}, {"class_labels": torch.full_like(y, 3)}  # label 3: the reserved null class
    with torch.no_grad():
        eps_c, eps_u = model(x, t, class_labels=y).sample, model(x, t, class_labels=null["class_labels"]).sample
        torch.testing.assert_close(guided_epsilon(model, x, t, c, null, 2.5), 3.5 * eps_c - 2.5 * eps_u)
        assert torch.equal(guided_epsilon(model, x, t, c, null, 0.0), eps_c)
        assert torch.equal(epsilon(model, x, t, c), eps_c)


@pytest.mark.parametrize("case,match", [
    ("tensor_batch", "needs batches \\(images, labels\\)"),
    ("three_items", "needs batches \\(images, labels\\); got a tuple of 3"),
    ("float_labels", "class labels must be integers"),
    ("label_count", "class_labels has 4 rows for 5 examples"),
    ("task_range", "must lie in \\[0, 2\\) \\(num_classes\\)"),
    ("model_range", "must lie in \\[0, 3\\) \\(the model's num_class_embeds\\)"),
    ("num_classes_vs_model", "num_classes=4 differs from the model's num_class_embeds=3"),
    ("unconditional_task", "the model is class-conditional"),
    ("class_on_plain_unet", "the model has no class embedding"),
    ("dict_without_label", "needs one of the keys"),
])
def test_class_condition_errors(case, match):
    sch = scheduler()
    x, y = class_data(5, 0)
    task = DiffusionTask(sch, num_train_draws=1, condition="class")
    model, batch = class_unet(), (x, y)
    if case == "tensor_batch":
        batch = x
    elif case == "three_items":
        batch = (x, y, y)
    elif case == "float_labels":
        batch = (x, y.double())
    elif case == "label_count":
        batch = (x, y[:4])
    elif case == "task_range":
        task = DiffusionTask(sch, num_train_draws=1, condition=Conditioning("class", num_classes=2))
        batch = (x, torch.tensor([0, 1, 2, 0, 1]))
    elif case == "model_range":
        batch = (x, torch.tensor([0, 1, 3, 0, 1]))
    elif case == "num_classes_vs_model":
        task = DiffusionTask(sch, num_train_draws=1, condition=Conditioning("class", num_classes=4))
    elif case == "unconditional_task":
        task = DiffusionTask(sch, num_train_draws=1)
    elif case == "class_on_plain_unet":
        model = tiny_unet(size=4)
    elif case == "dict_without_label":
        batch = {"image": x, "y": y}
    with pytest.raises(ValueError, match=match):
        rows = task.draws(batch, torch.arange(5), "train", num_draws=1, seed=0)
        task.forward(model, rows)


@pytest.mark.parametrize("case,match", [
    ("width_vs_model", "width 10, the model's cross_attention_dim is 12"),
    ("width_vs_task", "width 12, the task's embed_dim is 10"),
    ("mask_shape", "encoder_attention_mask must have shape \\(B, L\\) = \\(4, 3\\)"),
    ("mask_values", "bool or hold only 0 and 1"),
    ("int_embeddings", "must be float token embeddings"),
    ("unconditional_task", "the model takes encoder_hidden_states"),
    ("text_on_class_unet", "the model has no cross-attention"),
])
def test_text_condition_errors(case, match):
    sch = scheduler()
    x, emb, mask = text_data(4, 0)
    task = DiffusionTask(sch, num_train_draws=1, condition="text")
    model, batch = text_unet(), (x, emb, mask)
    if case == "width_vs_model":
        batch = (x, emb[..., :10])
    elif case == "width_vs_task":
        task = DiffusionTask(sch, num_train_draws=1, condition=Conditioning("text", embed_dim=10))
    elif case == "mask_shape":
        batch = (x, emb, mask[:, :2])
    elif case == "mask_values":
        batch = (x, emb, mask.long() * 2)
    elif case == "int_embeddings":
        batch = (x, emb.long(), mask)
    elif case == "unconditional_task":
        task = DiffusionTask(sch, num_train_draws=1)
    elif case == "text_on_class_unet":
        model = class_unet()
    with pytest.raises(ValueError, match=match):
        rows = task.draws(batch, torch.arange(4), "train", num_draws=1, seed=0)
        task.forward(model, rows)


def test_conditioning_settings_are_validated():
    with pytest.raises(ValueError, match="condition must be one of"):
        DiffusionTask(scheduler(), condition="image")
    with pytest.raises(ValueError, match="num_classes must be a whole number"):
        Conditioning("class", num_classes=0)
    with pytest.raises(ValueError, match="embed_dim is for condition='text'"):
        Conditioning("class", embed_dim=8)
    with pytest.raises(TypeError, match="condition must be None"):
        DiffusionTask(scheduler(), condition=3)
    # the conditioning is part of the task's identity (checkpoints and stored scores record it)
    from kfac_influence.identity import task_fingerprint
    sch = scheduler()
    prints = {task_fingerprint(DiffusionTask(sch, condition=c)) for c in
              (None, "class", Conditioning("class", num_classes=3), "text", Conditioning("text", embed_dim=12))}
    assert len(prints) == 5
    assert task_fingerprint(DiffusionTask(sch, condition="class")) == \
        task_fingerprint(DiffusionTask(sch, condition=Conditioning("class")))


# ------------------------------------------------------------------------------------------------ curvlinops

class Flat(torch.nn.Module):
    """The UNet as curvlinops sees it: X = {x_t, t, condition keywords} -> f flattened to (B, D)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, X):
        cond = {k: v for k, v in X.items() if k not in ("x_t", "t")}
        return self.unet(X["x_t"], X["t"], **cond).sample.flatten(1)


def assert_same_kron(A1, G1, A2, G2, name):
    """A1 (x) G1 == A2 (x) G2: normalised factors and norm products agree."""
    na1, ng1, na2, ng2 = (torch.linalg.norm(m) for m in (A1, G1, A2, G2))
    torch.testing.assert_close(A1 / na1, A2 / na2, rtol=1e-9, atol=1e-12, msg=f"{name}: A direction")
    torch.testing.assert_close(G1 / ng1, G2 / ng2, rtol=1e-9, atol=1e-12, msg=f"{name}: G direction")
    torch.testing.assert_close(na1 * ng1, na2 * ng2, rtol=1e-9, atol=0, msg=f"{name}: scale")


@pytest.mark.parametrize("kind", ["class", "text"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conditional_factors_match_curvlinops(kind, approx, one_thread):
    curvlinops = pytest.importorskip("curvlinops")
    if kind == "class":
        unet, data = class_unet(), class_data(3, 1)
    else:
        unet, data = text_unet(), text_data(3, 1)
    task = DiffusionTask(scheduler(), num_train_draws=2, condition=kind)
    cfg = CurvatureConfig(method="kfac", approx=approx, fisher="type2", dtype=F64, seed=3)
    curv = fit_curvature(unet, task, data, cfg, draws_per_forward=4, progress=False)

    rows = task.draws(data, torch.arange(3), "fit", num_draws=2, seed=3)
    keys = [k for k in ("x_t", "t", "class_labels", "encoder_hidden_states", "encoder_attention_mask")
            if k in rows.data]
    batches = [({k: rows.data[k][s:s + 4] for k in keys}, rows.data["target"][s:s + 4].flatten(1))
               for s in range(0, len(rows), 4)]
    params = [p for n, m in unet.named_modules() if n in curv.module_names for p in m.parameters(recurse=False)]
    op = curvlinops.KFACLinearOperator(Flat(unet), torch.nn.MSELoss(reduction="mean"), params, batches,
                                       fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=False,
                                       check_deterministic=False, num_data=len(rows),
                                       batch_size_fn=lambda X: X["x_t"].shape[0])
    op.compute_kronecker_factors()
    names = curv.module_names
    if kind == "text":  # cross-attention keys and values: the text tokens are their input positions
        cross = [n for n in names if n.endswith(("attn2.to_k", "attn2.to_v"))]
        assert len(cross) == 8 and all(curv.A(n).shape == (12, 12) for n in cross)
    else:
        assert "time_embedding.linear_1" in names and not any("class_embedding" in n for n in names)
    for name in names:
        key = f"unet.{name}"
        assert_same_kron(curv.A(name), curv.G(name), op._input_covariances[key], op._gradient_covariances[key],
                         name)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_conditional_ekfac_matches_curvlinops(kind, one_thread):
    """EK-FAC (eigenbases and corrected eigenvalues, type-2, expand) equals curvlinops' EKFACLinearOperator as an
    operator: Q_G [(Q_G^T V Q_A) * Lambda] Q_A^T for random V (basis-free; factor 1)."""
    curvlinops = pytest.importorskip("curvlinops")
    unet, data = (class_unet(), class_data(3, 1)) if kind == "class" else (text_unet(), text_data(3, 1))
    task = DiffusionTask(scheduler(), num_train_draws=2, condition=kind)
    cfg = CurvatureConfig(method="ekfac", fisher="type2", dtype=F64, seed=3)
    curv = fit_curvature(unet, task, data, cfg, draws_per_forward=4, progress=False)
    rows = task.draws(data, torch.arange(3), "fit", num_draws=2, seed=3)
    keys = [k for k in ("x_t", "t", "class_labels", "encoder_hidden_states", "encoder_attention_mask")
            if k in rows.data]
    batches = [({k: rows.data[k][s:s + 4] for k in keys}, rows.data["target"][s:s + 4].flatten(1))
               for s in range(0, len(rows), 4)]
    params = [p for n, m in unet.named_modules() if n in curv.module_names for p in m.parameters(recurse=False)]
    op = curvlinops.EKFACLinearOperator(Flat(unet), torch.nn.MSELoss(reduction="mean"), params, batches,
                                        fisher_type="type-2", kfac_approx="expand", separate_weight_and_bias=False,
                                        check_deterministic=False, num_data=len(rows),
                                        batch_size_fn=lambda X: X["x_t"].shape[0])
    op.compute_kronecker_factors()
    op.compute_eigenvalue_correction()
    g = torch.Generator().manual_seed(0)
    for name in curv.module_names:
        key = f"unet.{name}"
        (qa, qg), lam = curv.eigenbases(name), curv.eigenvalues(name)
        qa2, qg2 = op._input_covariances_eigenvectors[key], op._gradient_covariances_eigenvectors[key]
        lam2 = op._corrected_eigenvalues[key]
        lam2 = next(iter(lam2.values())) if isinstance(lam2, dict) else lam2  # layers without bias: by parameter
        V = torch.randn(lam.shape, generator=g, dtype=F64)
        ours = qg @ ((qg.T @ V @ qa) * lam) @ qa.T
        theirs = qg2 @ ((qg2.T @ V @ qa2) * lam2) @ qa2.T
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12 * float(theirs.abs().max()), msg=name)


# ------------------------------------------------------------------------------- scores against brute force

def head_matrix(model):
    return torch.cat([model.head.weight, model.head.bias[:, None]], 1)


def labelnet_reference(model, plain, fit_cfg, train, queries, damping, drop=False):
    """Scores from the definitions: exact GGN of ``head`` (mean over the fit draws of J^T (2/D) J, J by
    autograd) and per-example gradients (mean over draws of autograd gradients), with a dense damped solve.
    ``drop``: call the model without its condition (what a task that lost the condition would compute)."""
    def f_of(W, rows, i, labels):
        p = {"head.weight": W[:, :-1], "head.bias": W[:, -1]}
        kw = {} if drop else {"class_labels": labels[rows.example[i:i + 1]]}
        return torch.func.functional_call(model, p, (rows.data["x_t"][i:i + 1], rows.data["t"][i:i + 1]), kw)

    W0 = head_matrix(model).detach()
    x, y = train
    rows = plain.draws(x, torch.arange(len(x)), "fit", num_draws=fit_cfg.num_draws, seed=fit_cfg.seed)
    D = x[0].numel()
    ggn = 0
    for i in range(len(rows)):
        J = torch.autograd.functional.jacobian(lambda W: f_of(W, rows, i, y).flatten(), W0)  # (D, d_out, d_in')
        J = J.transpose(1, 2).reshape(D, -1)  # column-major vec, the vec in which A (x) G acts
        ggn = ggn + J.T @ J * (2.0 / D)
    ggn = ggn / len(rows)

    def grads(data, purpose):
        imgs, labels = data
        m = plain.num_draws(purpose)
        r = plain.draws(imgs, torch.arange(len(imgs)), purpose, num_draws=m, seed=plain.seed)
        out = torch.zeros(len(imgs), W0.numel(), dtype=F64)
        for i in range(len(r)):
            W = W0.clone().requires_grad_(True)
            loss = (f_of(W, r, i, labels) - r.data["target"][i:i + 1]).pow(2).mean() / m
            (g,) = torch.autograd.grad(loss, W)
            out[int(r.example[i])] += g.T.reshape(-1)
        return out

    gq, gt = grads(queries, "query"), grads(train, "train")
    return gq @ torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=F64), gt.T)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_conditional_scores_equal_dense_ggn_solve_and_depend_on_the_condition(method, one_thread):
    model = LabelNet()
    sch = scheduler()
    common = dict(num_train_draws=2, num_query_draws=3, seed=7)
    task = DiffusionTask(sch, condition="class", **common)
    plain = DiffusionTask(sch, **common)  # same draws, no condition: the references add it themselves
    cfg = CurvatureConfig(method=method, fisher="type2", dtype=F64, modules=("head",), num_draws=2, seed=5)
    train, queries = class_data(6, 0), class_data(3, 9)
    lam = 1e-2

    def scores(tr, qu):
        curv = fit_curvature(model, task, tr, cfg, draws_per_forward=3, progress=False)
        return pairwise_scores(model, task, curv, qu, tr, draws_per_forward=4, progress=False, damping=lam)

    S = scores(train, queries)
    ref = labelnet_reference(model, plain, cfg, train, queries, lam)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    # conditions matter: other training labels, other query labels, or no condition at all give other scores,
    # each equal to its own reference
    moved = (train[0], (train[1] + 1) % 3)
    S_moved = scores(moved, queries)
    torch.testing.assert_close(S_moved, labelnet_reference(model, plain, cfg, moved, queries, lam), rtol=1e-9,
                               atol=1e-12 * float(ref.abs().max()))
    requeried = (queries[0], (queries[1] + 1) % 3)
    S_req = scores(train, requeried)
    torch.testing.assert_close(S_req, labelnet_reference(model, plain, cfg, train, requeried, lam), rtol=1e-9,
                               atol=1e-12 * float(ref.abs().max()))
    dropped = labelnet_reference(model, plain, cfg, train, queries, lam, drop=True)
    for other in (S_moved, S_req, dropped):
        assert (other - S).norm() > 0.05 * S.norm()


def explicit_grads(model, plain, layers, images, cond, purpose):
    """Per-example gradients (mean over draws) by autograd on the parameters, the model called with
    ``cond[k][example]`` for every condition keyword k, one draw at a time."""
    m = plain.num_draws(purpose)
    rows = plain.draws(images, torch.arange(len(images)), purpose, num_draws=m, seed=plain.seed)
    out = {k: torch.zeros((len(images),) + bf.weight_matrix_grad_shape(l), dtype=F64) for k, l in layers.items()}
    for i in range(len(rows)):
        e = int(rows.example[i])
        f = model(rows.data["x_t"][i:i + 1], rows.data["t"][i:i + 1],
                  **{k: v[e:e + 1] for k, v in cond.items()}).sample
        loss = (f - rows.data["target"][i:i + 1]).pow(2).mean() / m
        for k, g in bf.param_grads(model, layers, loss).items():
            out[k][e] += g
    return out


@pytest.mark.parametrize("kind", ["class", "text"])
def test_conditional_unet_scores_equal_explicit_gradients_and_dense_kfac_solve(kind, one_thread):
    sch = scheduler()
    common = dict(num_train_draws=2, num_query_draws=2, seed=3)
    task, plain = DiffusionTask(sch, condition=kind, **common), DiffusionTask(sch, **common)
    if kind == "class":
        unet, train, queries = class_unet(), class_data(5, 2), class_data(2, 8)
        keys = ("class_labels",)
        patterns = ("conv_in", "time_embedding.*", "*attentions.0.to_k", "*attentions.0.to_v", "conv_out")
    else:
        unet, train, queries = text_unet(), text_data(5, 2), text_data(2, 8)
        keys = ("encoder_hidden_states", "encoder_attention_mask")
        patterns = ("conv_in", "time_embedding.linear_2", "*attn2.to_*", "conv_out")
    cfg = CurvatureConfig(method="kfac", fisher="mc", dtype=F64, modules=patterns, num_draws=2)
    curv = fit_curvature(unet, task, train, cfg, draws_per_forward=3, progress=False)
    lam = 1e-3
    S = pairwise_scores(unet, task, curv, queries, train, draws_per_forward=3, progress=False, damping=lam)

    layers = {n: m for n, m in unet.named_modules() if n in curv.module_names}
    assert len(layers) >= 5
    gq = explicit_grads(unet, plain, layers, queries[0], dict(zip(keys, queries[1:])), "query")
    gt = explicit_grads(unet, plain, layers, train[0], dict(zip(keys, train[1:])), "train")
    ref = 0
    for k in layers:
        A, G = curv.A(k), curv.G(k)
        K = torch.kron(A, G) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=F64)
        vq = gq[k].transpose(1, 2).reshape(len(gq[k]), -1)  # column-major vec
        vt = gt[k].transpose(1, 2).reshape(len(gt[k]), -1)
        ref = ref + vq @ torch.linalg.solve(K, vt.T)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-10 * float(ref.abs().max()))
    if kind == "text":  # masked tokens reach no gradient: changing their embeddings changes no score
        emb = train[1].clone()
        emb[~train[2]] = 100.0
        S_pad = pairwise_scores(unet, task, curv, queries, (train[0], emb, train[2]), draws_per_forward=3,
                                progress=False, damping=lam)
        torch.testing.assert_close(S_pad, S, rtol=1e-9, atol=1e-12 * float(S.abs().max()))
