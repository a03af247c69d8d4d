import torch

from mgie.config import EditHeadConfig
from mgie.edit_head import EditHead


def paper_head_params(d_llm=4096, d=512, ff=2048, q=77, c=768, n_enc=4, n_dec=4):
    """Independent count of the official EditMapper's parameters."""
    attn = 4 * d * d + 4 * d  # in_proj (3d x d + 3d) + out_proj (d x d + d)
    mlp = d * ff + ff + ff * d + d
    ln = 2 * d
    enc_layer = attn + mlp + 2 * ln
    dec_layer = 2 * attn + mlp + 3 * ln
    return (d_llm * d + d) + q * d + n_enc * enc_layer + ln + n_dec * dec_layer + ln + (d * c + c)


def test_paper_head_parameter_count():
    head = EditHead(EditHeadConfig(), 4096, 768)
    n = sum(p.numel() for p in head.parameters())
    assert n == paper_head_params()
    assert 31.9e6 < n < 32.0e6  # reference: about 31.96M


def test_shapes_null_and_determinism():
    torch.manual_seed(0)
    head = EditHead(
        EditHeadConfig(
            hidden_size=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ff_size=64, num_queries=7
        ),
        48,
        24,
    ).eval()
    h, e = torch.randn(3, 5, 48), torch.randn(5, 48)
    out = head(h, e)
    assert out.shape == (3, 7, 24)
    torch.testing.assert_close(head(h, e), out)
    null = head.null(e, batch=3)
    assert null.shape == (3, 7, 24)
    torch.testing.assert_close(null[0], head(torch.zeros(1, 5, 48), e)[0])
    # The input is H + E: shifting H by E and removing E gives the same output.
    torch.testing.assert_close(head(h + e, torch.zeros_like(e)), out, rtol=1e-5, atol=1e-5)
