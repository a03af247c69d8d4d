"""The MGIE edit head (official ``EditMapper``, mgie_llava.py L187-203; paper section 3.2).

``y = out(Transformer(src=in(H + E), tgt=Q))``: the [IMG] hidden states ``H`` plus the [IMG]
input embeddings ``E`` are projected to ``hidden_size``, a pre-norm encoder-decoder Transformer
(no masks, no dropout by default) maps them onto ``num_queries`` learned queries, and a last
Linear projects to the UNet's cross-attention width. Sizes come from the LLM and UNet configs.
"""

from __future__ import annotations

import torch
from torch import nn

from mgie.config import EditHeadConfig


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

    def forward(self, hidden: torch.Tensor, img_embeds: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B, N, D) [IMG] states, ``img_embeds`` (N, D) or (B, N, D) -> (B, Q, C)."""
        x = self.llm2hid(hidden + img_embeds)  # (B, N, d)
        q = self.query.expand(x.shape[0], -1, -1)  # (B, Q, d)
        y = self.mapper(src=x, tgt=q)  # (B, Q, d)
        return self.hid2feat(y)  # (B, Q, C)

    def null(self, img_embeds: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """The null (unconditional) text condition: the head on zero states plus ``E``; (batch, Q, C)."""
        zeros = (
            torch.zeros_like(img_embeds).unsqueeze(0)
            if img_embeds.dim() == 2
            else torch.zeros_like(img_embeds[:1])
        )
        return self.forward(zeros, img_embeds).expand(batch, -1, -1)
