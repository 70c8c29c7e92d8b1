"""Dense ground truth, computed without headwater's capture or curvature code.

- ``autograd_grads``: per-example gradients from ``loss.backward()`` and ``.grad``.
- ``dense_gauss_newton``: ``G = mean_n J_n^T H_n J_n`` from ``torch.func.jacrev`` of the
  model output w.r.t. the tracked weights and ``torch.func.hessian`` of the loss w.r.t. the
  output. Both in canonical row-major [O, I] order, layers concatenated in tracking order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev


def autograd_grads(model, task, data, layers, measurement: bool = False) -> torch.Tensor:
    """[N, P] per-example gradients of the loss (or measurement) w.r.t. tracked layers."""
    rows = []
    for item in data:
        model.zero_grad(set_to_none=True)
        batch = task.collate([item])
        out = task.measurement(model, batch) if measurement else task.loss(model, batch, sample=False)
        out.backward()
        parts = []
        for name, ad in layers.items():
            mod = model.get_submodule(name)
            parts.append(ad.weight_grad(mod).reshape(-1))
        rows.append(torch.cat(parts))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def dense_gauss_newton(model, layers, inputs: torch.Tensor, loss: str) -> torch.Tensor:
    """[P, P] Gauss-Newton of the per-example loss, averaged over ``inputs`` [N, d_in]."""
    names = list(layers)
    canon = tuple(layers[n].weight(model.get_submodule(n)) for n in names)

    def out(canon_vals, x):
        params = {}
        for n, c in zip(names, canon_vals):
            parts = layers[n].split(c)
            params[f"{n}.weight"] = parts[0]
            if layers[n].has_bias:
                params[f"{n}.bias"] = parts[1]
        return functional_call(model, params, (x[None],))[0]

    def out_loss(z):
        if loss == "ce":
            return F.cross_entropy(z[None], torch.zeros(1, dtype=torch.long))  # Hessian ignores the label
        return 0.5 * (z**2).sum()

    total = 0
    for x in inputs:
        jac = jacrev(out)(canon, x)  # tuple of [C, O, I]
        j = torch.cat([t.reshape(t.shape[0], -1) for t in jac], dim=1)  # [C, P]
        h = hessian(out_loss)(out(canon, x).detach())  # [C, C]
        total = total + j.T @ h @ j
    return total / len(inputs)


def blocks(dense: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    """Split a [P, P] matrix into its per-layer diagonal blocks."""
    out, lo = {}, 0
    for name, ad in layers.items():
        size = ad.out_features * ad.in_features
        out[name] = dense[lo : lo + size, lo : lo + size]
        lo += size
    return out
