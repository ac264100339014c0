"""What tests do to models built by the official code before comparing them with updetr's: non-trivial
FrozenBatchNorm statistics, and a checkpoint saved the way the official training loops save one."""
from __future__ import annotations

import argparse

import torch


def randomise_frozen_bn(model: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial FrozenBN statistics (drawn from `g`): a fresh ResNet has scale 1 / shift 0, which would hide
    a wrong BatchNorm fold on updetr's default path."""
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def save_like_official(model: torch.nn.Module, groups: list[dict], args: argparse.Namespace, path,
                       epoch: int) -> None:
    """`utils.save_on_master({...}, checkpoint_path)` of the official training loops: AdamW over the official
    parameter `groups` and StepLR, one step on zero gradients to fill the optimizer state, then
    `{model, optimizer, lr_scheduler, epoch, args}`."""
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    lr_scheduler.step()
    model.zero_grad(set_to_none=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args}, path)
