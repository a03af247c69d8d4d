"""mgie.precision: bf16 autocast for training, with the attention kept in float32 on the CPU."""

import pytest
import torch
import torch.nn.functional as F

from mgie import precision
from mgie.config import ConfigError, load_config
from mgie.precision import _SDPA, autocast, float32_attention

from .conftest import make_batch, make_model

CPU = torch.device("cpu")


def _qkv(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 9, 16, generator=g).to(dtype) for _ in range(3)]


def test_attention_runs_in_float32_inside_autocast_and_is_restored():
    q, k, v = _qkv()
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True  # no fully masked row
    want = _SDPA(q.float(), k.float(), v.float(), attn_mask=mask).to(torch.bfloat16)
    with autocast(CPU, "bfloat16"):
        assert F.scaled_dot_product_attention is not _SDPA
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        additive = F.scaled_dot_product_attention(q, k, v, torch.zeros(9, 9, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(additive, _SDPA(q.float(), k.float(), v.float()).to(torch.bfloat16))
    assert F.scaled_dot_product_attention is _SDPA
    with pytest.raises(RuntimeError), float32_attention():
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is _SDPA  # restored on an exception too


def test_multihead_attention_module_takes_the_float32_path():
    """nn.MultiheadAttention (the edit head's nn.Transformer) calls the patched function too."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    calls = []

    def spy(*a, **kw):
        calls.append(a[0].dtype)
        return _SDPA(*a, **kw)

    with float32_attention():
        precision_sdpa, precision._SDPA = precision._SDPA, spy
        try:
            with torch.autocast("cpu", torch.bfloat16):
                mha(x, x, x, need_weights=False)
        finally:
            precision._SDPA = precision_sdpa
    assert calls == [torch.float32]


def test_bf16_training_step_is_close_to_float32_and_keeps_float32_weights(tiny_cfg, tokenizer):
    model = make_model(tiny_cfg, tokenizer)
    batch = make_batch(model, n=2)
    losses, grads = {}, {}
    for mode in ("none", "bfloat16"):
        model.zero_grad()
        with autocast(CPU, mode):
            out = model(**batch, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        losses[mode] = out.loss.detach()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert losses["bfloat16"].dtype == torch.float32
    assert not torch.equal(losses["none"], losses["bfloat16"])  # autocast did change the arithmetic
    torch.testing.assert_close(losses["bfloat16"], losses["none"], rtol=3e-2, atol=0)
    assert torch.isfinite(grads["bfloat16"]).all() and grads["bfloat16"].dtype == torch.float32
    cos = F.cosine_similarity(grads["none"], grads["bfloat16"], dim=0)
    assert cos > 0.98, cos
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_config_rejects_an_unknown_autocast_mode():
    with pytest.raises(ConfigError, match="train.autocast"):
        load_config("configs/tiny.yaml", ["train.autocast=float16"])
    with pytest.raises(ValueError, match="autocast mode"):
        with autocast(CPU, "float16"):
            pass
