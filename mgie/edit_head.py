"""The MGIE edit head (official ``EditMapper``, mgie_llava.py L187-203; paper section 3.2).

``y = out(Transformer(src=in(H + E), tgt=Q))``: the [IMG] hidden states ``H`` plus the [IMG]
input embeddings ``E`` are projected to ``hidden_size``, a pre-norm encoder-decoder Transformer
(no masks, no dropout by default) maps them onto ``num_queries`` learned queries, and a last
Linear projects to the UNet's cross-attention width. Sizes come from the LLM and UNet configs.

With ``read_text`` (not in the paper) the source sequence also holds the expressive text's
tokens, each its last-layer state plus its input embedding (rescaled to the state's norm),
through the same ``in`` projection, plus fixed sinusoidal positions (no new weights: a paper
head's folder loads as it is); padded text tokens are masked out of both attentions.

With ``map_grid`` (not in the paper) a :class:`MapHead` predicts a ``map_grid`` x ``map_grid``
map of where the edit changes the image (logits) from what the head reads (the [IMG] states and
the text tokens), which the UNet reads as an input channel (:func:`mgie.diffusion.unet_input`).
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


class MapHead(nn.Module):
    """Where an edit changes the image, from the tokens the edit head reads: ``grid * grid``
    learned cell queries attend (a pre-norm Transformer decoder: self-attention between the cells,
    cross-attention to the tokens) to the [IMG] states and the expressive text, one logit per cell.

    It reads the tokens themselves, not the edit head's output: a head whose output does not yet
    follow "the top left corner" (mgie-shapes) cannot pass the place on. With ``patches`` > 0 it
    also reads that many image-patch states, each with a learned position (where "the red
    square" is must be seen in the image). With ``cells`` each cell's query also holds the
    patch states under it (normalised, projected; the patch grid average-pooled to the map's), so
    a cell sees what it holds and asks the text whether that is what the edit names.
    """

    def __init__(
        self, llm_hidden: int, width: int, heads: int, grid: int, patches: int = 0, layers: int = 2,
        cells: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.grid = grid
        self.inp = nn.Linear(llm_hidden, width)
        self.cells = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        if patches:
            self.patch_pos = nn.Parameter(torch.randn(1, patches, width) * 0.02)
        if cells:
            self.cell_in = nn.Sequential(nn.LayerNorm(llm_hidden), nn.Linear(llm_hidden, width))
        layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout=0.0, norm_first=True, batch_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))
        self.out = nn.Linear(width, 1)

    def forward(
        self, tokens: torch.Tensor, pad: torch.Tensor | None = None, patches: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``tokens`` (B, S, D), ``pad`` (B, S) True = ignore, ``patches`` (B, P, D) image-patch
        states (``patches`` > 0 or ``cells`` only) -> logits (B, 1, grid, grid)."""
        q = self.cells.expand(tokens.shape[0], -1, -1)  # (B, g*g, w)
        if hasattr(self, "cell_in"):
            q = q + self.cell_in(self.pool_patches(patches))  # (B, g*g, w)
        memory = self.inp(tokens)  # (B, S, w)
        if hasattr(self, "patch_pos"):
            memory = torch.cat([self.inp(patches) + self.patch_pos, memory], 1)  # (B, P + S, w)
            if pad is not None:
                pad = torch.cat([torch.zeros(patches.shape[:2], dtype=torch.bool, device=pad.device), pad], 1)
        y = self.decoder(q, memory, memory_key_padding_mask=pad)  # (B, g*g, w)
        return self.out(y).view(-1, 1, self.grid, self.grid)

    def pool_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, D) row-major patch states of a square patch grid -> (B, g*g, D), each cell the
        mean of the patches it covers."""
        side = math.isqrt(patches.shape[1])
        if side == self.grid:
            return patches
        x = patches.transpose(1, 2).reshape(len(patches), -1, side, side)  # (B, D, s, s)
        return nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # (B, g*g, D)


def new_map_head(cfg: EditHeadConfig, llm_hidden: int, patches: int) -> MapHead:
    """A freshly initialised :class:`MapHead` as ``cfg`` asks for (``patches``: the image's patch
    count, read only with ``cfg.map_image``)."""
    return MapHead(
        llm_hidden, cfg.hidden_size, cfg.num_heads, cfg.map_grid, patches if cfg.map_image else 0,
        cells=cfg.map_cells,
    )  # fmt: skip


class EditHead(nn.Module):
    """Maps (B, N, llm_hidden) [IMG] states to (B, num_queries, cross_attention_dim) conditioning."""

    def __init__(self, cfg: EditHeadConfig, llm_hidden: int, cross_attention_dim: int, patches: int = 0):
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
            self.map_head = new_map_head(cfg, llm_hidden, patches)

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

    def edit_map(
        self,
        hidden: torch.Tensor,
        img_embeds: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Edit-map logits (B, 1, g, g) from the inputs of :meth:`forward` (``map_grid`` only):
        the [IMG] states plus embeddings, then the text tokens (padding masked); ``patches``
        (B, P, D) the image-patch states (``map_image`` only)."""
        x = hidden + img_embeds  # (B, N, D)
        if text is None or text.shape[1] == 0:
            return self.map_head(x, patches=patches)
        keep = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), text_mask], 1)
        return self.map_head(torch.cat([x, text], 1), ~keep, patches)  # (B, 1, g, g)

    def null(self, img_embeds: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """The null (unconditional) text condition: the head on zero states plus ``E``, no text
        tokens; (batch, Q, C)."""
        zeros = (
            torch.zeros_like(img_embeds).unsqueeze(0)
            if img_embeds.dim() == 2
            else torch.zeros_like(img_embeds[:1])
        )
        return self.forward(zeros, img_embeds).expand(batch, -1, -1)
