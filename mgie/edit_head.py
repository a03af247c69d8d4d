"""The MGIE edit head (official ``EditMapper``, mgie_llava.py L187-203; paper section 3.2).

``y = out(Transformer(src=in(H + E), tgt=Q))``: the [IMG] hidden states ``H`` plus the [IMG]
input embeddings ``E`` are projected to ``hidden_size``, a pre-norm encoder-decoder Transformer
(no masks, no dropout by default) maps them onto ``num_queries`` learned queries, and a last
Linear projects to the UNet's cross-attention width. Sizes come from the LLM and UNet configs.

With ``read_text`` (not in the paper) the source sequence also holds the expressive text's
tokens, each its last-layer state plus its input embedding (rescaled to the state's norm),
through the same ``in`` projection, plus fixed sinusoidal positions (no new weights: a paper
head's folder loads as it is); padded text tokens are masked out of both attentions.

With ``map_grid`` (not in the paper) a small MLP, ``map_head``, reads the flattened output
condition and predicts a ``map_grid`` x ``map_grid`` map of where the edit changes the image
(logits), which the UNet reads as an input channel (:func:`mgie.diffusion.unet_input`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mgie.config import EditHeadConfig


def sinusoid(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Transformer sine/cosine position encodings: (length, dim), dim even."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    enc = torch.zeros(length, dim, device=device)
    enc[:, 0::2], enc[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return enc.to(dtype)


def build_map_head(num_queries: int, cross_attention_dim: int, grid: int, hidden: int = 256) -> nn.Sequential:
    """The edit-map MLP: flattened (B, Q * C) condition -> (B, grid * grid) logits."""
    return nn.Sequential(
        nn.Linear(num_queries * cross_attention_dim, hidden), nn.GELU(), nn.Linear(hidden, grid * grid)
    )


class EditHead(nn.Module):
    """Maps (B, N, llm_hidden) [IMG] states to (B, num_queries, cross_attention_dim) conditioning."""

    def __init__(self, cfg: EditHeadConfig, llm_hidden: int, cross_attention_dim: int):
        super().__init__()
        self.cfg = cfg
        self.llm2hid = nn.Linear(llm_hidden, cfg.hidden_size)
        self.query = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size))
        self.mapper = nn.Transformer(
            d_model=cfg.hidden_size,
            nhead=cfg.num_heads,
            num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers,
            dim_feedforward=cfg.ff_size,
            dropout=cfg.dropout,
            norm_first=True,
            batch_first=True,
        )
        self.hid2feat = nn.Linear(cfg.hidden_size, cross_attention_dim)
        if cfg.map_grid:
            self.map_head = build_map_head(cfg.num_queries, cross_attention_dim, cfg.map_grid)

    def forward(
        self,
        hidden: torch.Tensor,
        img_embeds: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden`` (B, N, D) [IMG] states, ``img_embeds`` (N, D) or (B, N, D) -> (B, Q, C).

        ``text`` (B, T, D): the expressive text's states plus embeddings, ``text_mask`` (B, T)
        True at real tokens (``read_text`` only; None or T = 0: the [IMG] states alone).
        """
        x = self.llm2hid(hidden + img_embeds)  # (B, N, d)
        q = self.query.expand(x.shape[0], -1, -1)  # (B, Q, d)
        if text is None or text.shape[1] == 0:
            return self.hid2feat(self.mapper(src=x, tgt=q))  # (B, Q, C)
        t = self.llm2hid(text) + sinusoid(text.shape[1], x.shape[-1], x.device, x.dtype)  # (B, T, d)
        src = torch.cat([x, t], dim=1)  # (B, N + T, d)
        keep = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), text_mask], 1)
        pad = ~keep  # (B, N + T), True = ignore
        y = self.mapper(src=src, tgt=q, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        return self.hid2feat(y)  # (B, Q, C)

    def edit_map(self, cond: torch.Tensor) -> torch.Tensor:
        """Edit-map logits from the head's output: (B, Q, C) -> (B, 1, g, g) (``map_grid`` only)."""
        g = self.cfg.map_grid
        return self.map_head(cond.flatten(1)).view(-1, 1, g, g)

    def null(self, img_embeds: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """The null (unconditional) text condition: the head on zero states plus ``E``, no text
        tokens; (batch, Q, C)."""
        zeros = (
            torch.zeros_like(img_embeds).unsqueeze(0)
            if img_embeds.dim() == 2
            else torch.zeros_like(img_embeds[:1])
        )
        return self.forward(zeros, img_embeds).expand(batch, -1, -1)
