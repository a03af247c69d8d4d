"""Mixed precision for training: bfloat16 autocast, with attention kept in float32 on the CPU.

On a CPU with AVX512-BF16 (or AMX) oneDNN runs bf16 matmuls and convolutions about twice as fast
as float32, but PyTorch's CPU flash-attention kernel is slower in bf16 than in float32 (its
backward most of all: 9.2 ms against 4.0 ms a call on mgie-shapes' step), so on the CPU the
attention runs in float32 inside the autocast region. Weights, gradients and optimizer state stay
float32 (autocast only casts the inputs of the ops it lists).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_SDPA = F.scaled_dot_product_attention


def _sdpa_float32(query, key, value, *args, **kwargs):
    """``F.scaled_dot_product_attention`` computed in float32, returned in the query's dtype."""
    dtype = query.dtype
    up = [x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in args]
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast(query.device.type, enabled=False):
        return _SDPA(query.float(), key.float(), value.float(), *up, **kwargs).to(dtype)


@contextlib.contextmanager
def float32_attention() -> Iterator[None]:
    """Within the block, every call of ``F.scaled_dot_product_attention`` (transformers' sdpa
    attention, diffusers' AttnProcessor2_0, ``nn.MultiheadAttention``) computes in float32."""
    F.scaled_dot_product_attention = _sdpa_float32
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


@contextlib.contextmanager
def autocast(device: torch.device, mode: str) -> Iterator[None]:
    """The forward pass's precision: ``"none"`` (float32) or ``"bfloat16"`` (autocast; on the CPU
    with :func:`float32_attention`). Run the backward pass outside the block."""
    if mode == "none":
        yield
        return
    if mode != "bfloat16":
        raise ValueError(f"autocast mode {mode!r} is not one of ['none', 'bfloat16']")
    attention = float32_attention() if device.type == "cpu" else contextlib.nullcontext()
    with torch.autocast(device.type, torch.bfloat16), attention:
        yield
