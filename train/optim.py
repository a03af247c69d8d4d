"""Optimizer parameter groups, the LR schedule and the DeepSpeed config, all derived from MGIEConfig."""

from __future__ import annotations

import copy
import math

import torch

from mgie.config import ConfigError, MGIEConfig

# Batch sizes, optimizer and scheduler come from the train section; the deepspeed section may not set them.
DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
FORBIDDEN_KEYS = ("optimizer", "scheduler")


def param_groups(groups: dict[str, list[torch.nn.Parameter]], cfg: MGIEConfig) -> list[dict]:
    """AdamW groups with their own learning rates (a group's lr of 0 in config means ``train.lr``);
    the edit head's map MLP (``edit_map``) trains at the UNet's rate."""
    t = cfg.train
    lrs = {"lora": t.lr_lora, "img_tokens": t.lr_img_tokens, "mllm": t.lr_mllm, "edit_head": t.lr_edit_head,
           "edit_map": t.lr_unet, "unet": t.lr_unet}  # fmt: skip
    return [
        {"params": params, "lr": lrs[name] or t.lr, "weight_decay": t.weight_decay, "name": name}
        for name, params in groups.items()
        if params
    ]


def build_optimizer(groups: list[dict], cfg: MGIEConfig) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes), per ``train.optimizer``."""
    if cfg.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "train.optimizer=adamw8bit needs bitsandbytes (pip install -e '.[train]')"
            ) from None
        return bnb.optim.AdamW8bit(groups)
    return torch.optim.AdamW(groups)


def cosine_with_warmup(step: int, total: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``ceil(warmup_ratio * total)`` steps, then cosine to 0."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: MGIEConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine schedule with warm-up over ``train.max_steps`` optimizer steps."""
    total, ratio = cfg.train.max_steps, cfg.train.warmup_ratio
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, ratio))


def deepspeed_config(cfg: MGIEConfig, world_size: int) -> dict:
    """The DeepSpeed config: the YAML's ``deepspeed`` section plus the batch sizes, derived once."""
    ds = copy.deepcopy(cfg.deepspeed)
    for key in DERIVED_KEYS:
        if key in ds:
            raise ConfigError(
                f"deepspeed.{key} is derived; set train.micro_batch_size and train.grad_accum instead"
            )
    for key in FORBIDDEN_KEYS:
        if key in ds:
            raise ConfigError(f"deepspeed.{key} is not used: the optimizer and LR schedule come from train.*")
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    ds.setdefault("zero_optimization", {"stage": 0})
    ds["zero_allow_untested_optimizer"] = True  # our AdamW is a client optimizer
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    return ds
