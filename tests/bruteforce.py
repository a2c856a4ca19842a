"""Slow, loop-based definitions (design.md section 2) used as independent references by the tests.

Nothing here calls kfac_kernels or kfac_influence's capture: patches are unfolded by explicit loops, output
gradients come from replacing a layer's output with a leaf tensor, weight gradients from autograd on parameters.
"""
import math

import torch
import torch.nn as nn


def patches_by_loops(x, k, stride, padding, dilation):
    """x: (C, H, W) -> (R, C*kh*kw) in weight.flatten(1) order, with explicit loops and zero padding."""
    C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, padding, dilation
    oh = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            p = []
            for c in range(C):
                for u in range(kh):
                    for v in range(kw):
                        r, s = i * sh - ph + u * dh, j * sw - pw + v * dw
                        p.append(x[c, r, s] if 0 <= r < H and 0 <= s < W else x.new_zeros(()))
            rows.append(torch.stack(p))
    return torch.stack(rows)


def layer_io(model, layer, inputs):
    """Forward with ``layer``'s output replaced by a leaf: returns (layer input, leaf z, model output)."""
    store = {}

    def hook(m, inp, out):
        z = out.detach().clone().requires_grad_(True)
        store["x"], store["z"] = inp[0].detach(), z
        return z

    h = layer.register_forward_hook(hook)
    try:
        f = model(inputs)
    finally:
        h.remove()
    return store["x"], store["z"], f


def positions(layer, t):
    """Layer input/output tensor of one example -> rows over positions (R, d)."""
    if isinstance(layer, nn.Conv2d):
        return t.flatten(1).T
    return t.reshape(-1, t.shape[-1])


def input_rows(layer, x):
    """Input of one example -> (R, d_in + 1 if bias) with explicit patches for conv."""
    if isinstance(layer, nn.Conv2d):
        a = patches_by_loops(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    else:
        a = x.reshape(-1, x.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    return a


def vectors(fisher, f, target, xi):
    """Backpropagated vectors for one example's output f (D,)."""
    d = f.numel()
    if fisher == "type2":
        return [math.sqrt(2.0 / d) * torch.eye(d, dtype=f.dtype)[j].view_as(f) for j in range(d)]
    if fisher == "mc":
        return [math.sqrt(2.0 / d) * xi]
    return [(2.0 / d) * (f.detach() - target)]


def factors_by_definition(model, layer, X, Y, XI, fisher, approx):
    """A and G of one layer for a regression model, one draw per example, from the definitions."""
    A_sum, G_sum, n_pos = 0, 0, 0
    for n in range(X.shape[0]):
        x, z, f = layer_io(model, layer, X[n:n + 1])
        a = input_rows(layer, x[0])
        if approx == "expand":
            A_sum = A_sum + a.T @ a
            n_pos += a.shape[0]
        else:
            m = a.mean(0, keepdim=True)
            A_sum = A_sum + m.T @ m
            n_pos += 1
        for v in vectors(fisher, f[0], Y[n], XI[n] if XI is not None else None):
            (gz,) = torch.autograd.grad(f[0], z, v, retain_graph=True)
            g = positions(layer, gz[0])
            G_sum = G_sum + (g.T @ g if approx == "expand" else g.sum(0, keepdim=True).T @ g.sum(0, keepdim=True))
    return A_sum / n_pos, G_sum / X.shape[0]


def weight_matrix_grad(layer):
    """Current .grad of a layer's weight and bias as one (d_out, d_in') matrix."""
    w = layer.weight.grad.flatten(1)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.grad[:, None]], 1)
    return w.clone()


def param_grads(model, layers, scalar):
    """Gradient of ``scalar`` w.r.t. each layer's (weight, bias) as matrices."""
    for p in model.parameters():
        p.grad = None
    scalar.backward()
    return {name: weight_matrix_grad(l) for name, l in layers.items()}


def weight_matrix_grad_shape(layer):
    return (layer.weight.shape[0], layer.weight[0].numel() + int(layer.bias is not None))
