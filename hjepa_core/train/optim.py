"""AdamW with parameter groups: no weight decay on norms, biases, embeddings and tokens."""

from __future__ import annotations

import torch
from torch import nn

_NO_DECAY_NAMES = ("mask_token", "level_embed", "pos_embed", "cls_token")


def parameter_groups(model: nn.Module) -> list[dict]:
    """Splits trainable parameters into a decayed group and an undecayed one.

    Biases and normalisation weights (1-D tensors) and learned tokens / embeddings are not
    decayed, as in ViT / DINO recipes; the weight-decay schedule only touches group 0.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(token in name for token in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": 0.0, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
    ]


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`, fused (one kernel over all tensors) where torch has it
    for the parameters' device, else multi-tensor ``foreach``.

    On CPU, torch's default is the per-tensor loop: ~25x slower than the fused step for a ViT-S
    sized model (``benchmarks/README.md``). The fused step also takes AMP's grad scale without
    reading it on the host.
    """
    groups = parameter_groups(model)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except RuntimeError:  # a device (or dtype) without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=True)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group["apply_wd"] else 0.0
