"""GAN regularisers (docs/method.md#regularisers). Both keep the graph (``create_graph=True``),
so their results can be added to a loss and back-propagated into the networks' parameters.

Weights and intervals (``r1_gamma / 2 · interval``, ``pl_weight · interval``) are the caller's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from relaylearn.models.gan.random import randn_like


def r1_penalty(real_logits: Tensor, real_inputs: Tensor) -> Tensor:
    """Per-sample R1: ``Σ_{C,H,W} (∂ Σ real_logits / ∂ real_inputs)²`` → [N] (fp32).

    ``real_inputs`` [N, C, H, W] must require grad and be the tensor the logits were computed
    from (before augmentation, if any: the gradient flows through the augmentation pipe).
    """
    if not real_inputs.requires_grad:
        raise ValueError("r1_penalty: real_inputs must require grad (call .requires_grad_() before D's forward)")
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True)
    return grad.float().square().flatten(1).sum(dim=1)


def path_length_penalty(
    synthesize_fn: Callable[[Tensor], Tensor] | None, ws: Tensor, output: Tensor | None, pl_mean: Tensor, decay: float = 0.01
) -> tuple[Tensor, Tensor]:
    """StyleGAN2 path-length penalty.

    Args:
        synthesize_fn: ws → images (e.g. ``G.synthesize`` or ``lambda ws: G.synthesize(ws, seg)``);
            only called when ``output`` is None.
        ws: [N, num_ws, w_dim] that requires grad and produced ``output``.
        output: [N, C, H, W] generator output, or None to compute it as ``synthesize_fn(ws)``.
        pl_mean: scalar tensor, the running mean of path lengths (not modified).
        decay: EMA rate of ``pl_mean``.

    Returns ``(penalty, new_pl_mean)``: penalty = mean over samples of ``(len − new_pl_mean)²``
    where len = sqrt(mean over ws of Σ_{w_dim} (∂ Σ output·n / ∂ ws)²) and n ~ N(0, 1)/√(H·W);
    ``new_pl_mean`` = lerp(pl_mean, mean(len), decay), detached. Store it (after an all-reduce
    mean under DDP) with ``pl_mean.copy_(new_pl_mean)``. No host synchronisation.
    """
    if not ws.requires_grad:
        raise ValueError("path_length_penalty: ws must require grad")
    if output is None:
        if synthesize_fn is None:
            raise ValueError("path_length_penalty: give output or synthesize_fn")
        output = synthesize_fn(ws)
    output = output.float()
    height, width = output.shape[-2:]
    noise = randn_like(output) / (height * width) ** 0.5
    (grad,) = torch.autograd.grad((output * noise).sum(), ws, create_graph=True)
    lengths = grad.float().square().sum(dim=2).mean(dim=1).sqrt()  # [N]
    new_mean = pl_mean.float().lerp(lengths.mean(), decay)
    penalty = (lengths - new_mean).square().mean()
    return penalty, new_mean.detach()
