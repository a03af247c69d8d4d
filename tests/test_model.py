import re

import pytest
import torch

from mgie.model import CheckpointError, MGIEModel
from mgie.presets import mgie_7b

from .conftest import make_batch, make_model


def test_shapes_through_every_stage(model):
    b = make_batch(model, n=2, size=32)
    m = model.cfg.model
    logits, hidden = model.mllm_forward(b["input_ids"], b["attention_mask"], b["pixel_values"])
    L = b["input_ids"].shape[1]
    assert logits.shape == (2, L, m.mllm.text.vocab_size + 3 + m.mllm.num_img_tokens)
    assert hidden.shape == (2, L, m.mllm.text.hidden_size)
    assert model.img_embeddings().shape == (m.mllm.num_img_tokens, m.mllm.text.hidden_size)
    cond = model.condition(hidden, b["input_ids"])
    assert cond.shape == (2, m.edit_head.num_queries, m.diffusion.unet.cross_attention_dim)
    assert model.null_condition(2).shape == cond.shape
    out = model(**b, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(x) for x in (out.loss, out.lm_loss, out.edit_loss))
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.edit_loss)


def test_padding_side_does_not_change_img_states(model):
    """Left- and right-padded batches give the [IMG] states of each row run alone."""
    from mgie.tokens import pad_sequences

    model.eval()
    b = make_batch(model, n=2)
    rows = [r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert len(rows[0]) != len(rows[1])
    alone = []
    for i, r in enumerate(rows):
        ids = torch.tensor([r])
        _, h = model.mllm_forward(ids, torch.ones_like(ids), b["pixel_values"][i : i + 1])
        alone.append(model.condition(h, ids))
    for side in ("left", "right"):
        ids, mask = pad_sequences(rows, model.ids.pad, side=side)
        _, h = model.mllm_forward(ids, mask, b["pixel_values"])
        torch.testing.assert_close(model.condition(h, ids), torch.cat(alone), rtol=1e-4, atol=1e-5)


def _frozen_and_trainable(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def test_gradients_reach_exactly_the_trainable_parameters(model):
    trainable, frozen = _frozen_and_trainable(model)
    groups = model.trainable_groups()
    assert {id(p) for g in groups.values() for p in g} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    assert all(len(g) > 0 for k, g in groups.items() if k not in ("mllm", "edit_map"))
    assert groups["mllm"] == [] and groups["edit_map"] == []  # full MLLM training off, no map head
    assert not any(n.startswith("vae.") for n in trainable)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    assert not any(n.endswith("embed_tokens.token_adapter.base_layer.weight") for n in trainable)

    out = model(**make_batch(model), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    named = dict(model.named_parameters())
    for n in trainable:
        assert named[n].grad is not None and torch.isfinite(named[n].grad).all(), n
    for n in frozen:
        assert named[n].grad is None, n
    # LoRA B starts at zero, so A gets exactly zero gradient at step 0; B, rows, head and UNet get signal.
    for n in trainable:
        if "lora_A" not in n:
            assert named[n].grad.abs().sum() > 0, n


def test_edit_loss_alone_reaches_img_embeddings_through_the_llm(model):
    model.zero_grad()
    out = model(**make_batch(model), generator=torch.Generator().manual_seed(1))
    out.edit_loss.backward()
    embed = model.mllm.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    assert embed.grad is not None and (embed.grad.abs().sum(dim=1) > 0).all()  # every [IMG] row
    head = [p for n, p in model.mllm.named_parameters() if "lm_head" in n and p.requires_grad][0]
    assert head.grad is None or head.grad.abs().sum() == 0  # the LM head only learns from the CE


def test_lm_only_stage_skips_the_diffusion_branch(tiny_cfg, tokenizer):
    """edit_weight 0 (pre-training a from-scratch MLLM): the CE is unchanged, no UNet runs."""
    from dataclasses import replace

    model = make_model(tiny_cfg, tokenizer)
    batch = make_batch(model)
    full = model(**batch, generator=torch.Generator().manual_seed(0))
    model.cfg = replace(
        tiny_cfg, model=replace(tiny_cfg.model, loss=replace(tiny_cfg.model.loss, edit_weight=0.0))
    )
    calls = []
    model.unet.register_forward_hook(lambda *a: calls.append(1))
    lm_only = model(**batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lm_only.loss, full.lm_loss)
    assert lm_only.edit_loss == 0 and not calls


def test_rows_without_an_edit_train_the_ce_only(tiny_cfg, tokenizer):
    """``has_edit`` False (image-text pairs): the CE covers every row, the editing loss is the one of
    the edit rows alone, and a batch without an edit runs no UNet."""
    model = make_model(tiny_cfg, tokenizer)
    batch = make_batch(model, n=3)
    full = model(**batch, generator=torch.Generator().manual_seed(0))
    mixed = model(
        **batch, has_edit=torch.tensor([True, False, True]), generator=torch.Generator().manual_seed(0)
    )
    rows = torch.tensor([0, 2])
    alone = model(**{k: v[rows] for k, v in batch.items()}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed.lm_loss, full.lm_loss)
    torch.testing.assert_close(mixed.edit_loss, alone.edit_loss)
    assert not torch.allclose(mixed.edit_loss, full.edit_loss)
    torch.testing.assert_close(mixed.loss, mixed.lm_loss + 0.5 * mixed.edit_loss)
    calls = []
    model.unet.register_forward_hook(lambda *a: calls.append(1))
    none = model(
        **batch, has_edit=torch.zeros(3, dtype=torch.bool), generator=torch.Generator().manual_seed(0)
    )
    assert none.edit_loss == 0 and not calls
    torch.testing.assert_close(none.loss, full.lm_loss)


def test_change_weighting_leaves_unchanged_images_alone(tiny_cfg, tokenizer):
    """With source == target every weight is 1, so change_weight gives the plain loss; with an
    edit it gives another one."""
    from dataclasses import replace

    model = make_model(tiny_cfg, tokenizer)
    batch = make_batch(model)
    loss = replace(tiny_cfg.model.loss, change_weight=4.0)
    weighted = replace(tiny_cfg, model=replace(tiny_cfg.model, loss=loss))

    def edit(cfg, b):
        model.cfg = cfg
        return model(**b, generator=torch.Generator().manual_seed(0)).edit_loss

    same = {**batch, "target": batch["source"]}
    torch.testing.assert_close(edit(weighted, same), edit(tiny_cfg, same))
    edited = {**same, "target": same["source"].clone()}
    edited["target"][:, :, :8, :8] = -edited["target"][:, :, :8, :8]
    assert not torch.isclose(edit(weighted, edited), edit(tiny_cfg, edited))


def test_a_few_steps_drive_the_loss_down(tiny_cfg, tokenizer):
    model = make_model(tiny_cfg, tokenizer, seed=1)
    batch = make_batch(model, n=2)
    params = [p for g in model.trainable_groups().values() for p in g]
    opt = torch.optim.AdamW(params, lr=1e-2)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def loss_at(step_seed):
        return model(**batch, generator=torch.Generator().manual_seed(step_seed))

    with torch.no_grad():
        start = loss_at(123)
    for step in range(15):
        opt.zero_grad()
        loss_at(step).loss.backward()
        opt.step()
    with torch.no_grad():
        end = loss_at(123)
    assert end.loss < 0.8 * start.loss and end.lm_loss < start.lm_loss
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"


def test_save_load_gives_identical_outputs(tmp_path, tiny_cfg, tokenizer):
    model = make_model(tiny_cfg, tokenizer, seed=2)
    with torch.no_grad():  # make the adapters non-trivial, as after training
        for _n, p in model.mllm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = make_batch(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MGIEModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.ids == model.ids
    with torch.no_grad():
        l1, h1 = model.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        l2, h2 = loaded.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)  # LoRA merged: float rounding only
        torch.testing.assert_close(
            loaded.condition(h2, batch["input_ids"]),
            model.condition(h1, batch["input_ids"]),
            rtol=1e-5,
            atol=1e-5,
        )
        torch.testing.assert_close(loaded.null_condition(), model.null_condition(), rtol=1e-5, atol=1e-5)
        for a, b in zip(loaded.unet.state_dict().values(), model.unet.state_dict().values()):
            assert torch.equal(a, b)
    # Saving the loaded (plain) model again is bit-identical.
    loaded.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    for f in ("mllm/model.safetensors", "edit_head.safetensors"):
        x, y = load_file(tmp_path / "ckpt" / f), load_file(tmp_path / "again" / f)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_checkpoint_errors(tmp_path, tiny_cfg, tokenizer):
    with pytest.raises(CheckpointError, match="not found"):
        MGIEModel.from_pretrained(tmp_path / "nothing")
    model = make_model(tiny_cfg, tokenizer)
    model.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "edit_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        MGIEModel.from_pretrained(tmp_path / "c")
    # Weights that do not fit the config: a wider edit head in the config than in the file.
    model.save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="edit_head"):
        MGIEModel.from_pretrained(tmp_path / "d", overrides=["model.edit_head.num_queries=9"])
    with pytest.raises(ValueError, match="does not match"):
        MGIEModel.from_pretrained(tmp_path / "d", overrides=["model.mllm.text.intermediate_size=96"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.diffusion.unet.norm_num_groups=16", "unet: its norm_num_groups=32 differs from model.diffusion.unet.norm_num_groups=16"),
        ("model.diffusion.unet.attention_head_dim=4", "unet: its attention_head_dim=8 differs from model.diffusion.unet.attention_head_dim=4"),
        ("model.diffusion.vae.norm_num_groups=16", "vae: its norm_num_groups=32 differs from model.diffusion.vae.norm_num_groups=16"),
        ("model.diffusion.unet.pooled_condition=true", "unet: its class_embed_type=None differs from model.diffusion.unet.pooled_condition=True"),
    ],
)  # fmt: skip
def test_a_config_whose_diffusion_architecture_differs_from_the_folder_is_refused(
    tmp_path, tiny_cfg, tokenizer, override, message
):
    """Other GroupNorm groups or attention heads fit the same tensors, so a strict state-dict load
    would accept them and compute something else (how two baseline runs once trained a 32-group
    UNet under a one-group config): the folder's diffusers config must agree with the config."""
    from safetensors.torch import load_file

    from mgie.config import from_dict, merge_dicts, parse_override, to_dict
    from mgie.diffusion import build_unet, build_vae

    make_model(tiny_cfg, tokenizer).save_pretrained(tmp_path / "c")
    cfg = from_dict(merge_dicts(to_dict(tiny_cfg), parse_override(override)))
    # The trap: the folder's weights load strictly into the config's (different) architecture.
    d = cfg.model.diffusion
    part, built = ("vae", build_vae(d.vae)) if ".vae." in override else ("unet", build_unet(d.unet))
    saved = load_file(tmp_path / "c" / part / "diffusion_pytorch_model.safetensors")
    built.load_state_dict(saved, strict="pooled" not in override)  # pooled: the folder lacks only new keys
    with pytest.raises(CheckpointError, match=re.escape(message)):
        MGIEModel.from_pretrained(tmp_path / "c", cfg=cfg)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        MGIEModel.from_pretrained(tmp_path / "c", overrides=[override])
    assert MGIEModel.from_pretrained(tmp_path / "c").cfg.model.diffusion == tiny_cfg.model.diffusion


def test_paper_preset_parameter_counts_on_meta():
    with torch.device("meta"):
        model = MGIEModel.from_config(mgie_7b(), adapters=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    llm = count(model.mllm.model.language_model) + count(model.mllm.lm_head)
    assert 6.70e9 < llm < 6.76e9  # LLaMA-7B with a 32011-token vocabulary: about 6.74B
    assert model.mllm.lm_head.weight.shape == (32011, 4096)
    assert 303e6 < count(model.mllm.model.vision_tower) < 304e6  # CLIP ViT-L/14 vision: 303.5M
    assert 31.9e6 < count(model.edit_head) < 32.0e6
    assert 859e6 < count(model.unet) < 860e6  # SD-1.5 UNet with 8 input channels: 859.5M
    assert model.unet.conv_in.weight.shape == (320, 8, 3, 3)
    assert model.mllm.config.image_seq_length == 256 and model.mllm.config.image_token_id == 32000


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_loading_through_bitsandbytes(tmp_path, tiny_cfg, tokenizer, bits):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = make_model(tiny_cfg, tokenizer, adapters=False).eval()
    model.save_pretrained(tmp_path / "c")
    over = [f"model.quantization.bits={bits}", "model.quantization.compute_dtype=float32"]
    q = MGIEModel.from_pretrained(tmp_path / "c", overrides=over, adapters=True)
    layer_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    kinds = {type(mod) for n, mod in q.mllm.named_modules() if n.endswith("layers.0.mlp.up_proj.base_layer")}
    assert kinds == {layer_cls}
    assert not any(isinstance(mod, layer_cls) for n, mod in q.mllm.named_modules() if "vision_tower" in n)
    batch = make_batch(q)
    out = q(**batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for g in q.trainable_groups().values() for p in g)
    q.eval()
    with torch.no_grad():
        ref, _ = model.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        got, _ = q.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.25  # quantised (blocks of 64 on 64-wide layers), so not identical, but close


def test_variants_lora_off_mlp_projector_and_checkpointing(tiny_cfg, tokenizer):
    from mgie.config import from_dict, to_dict

    d = to_dict(tiny_cfg)
    d["model"]["lora"]["enabled"] = False
    d["model"]["mllm"]["projector"] = "mlp2x_gelu"
    cfg = from_dict(d)
    model = make_model(cfg, tokenizer)
    groups = model.trainable_groups()
    assert (
        groups["lora"] == groups["mllm"] == [] and len(groups["img_tokens"]) == 2
    )  # embedding + LM-head rows
    assert model.mllm.config.projector_hidden_act == "gelu"
    batch = make_batch(model)
    loss = model(**batch, generator=torch.Generator().manual_seed(0)).loss
    d["model"]["mllm"]["gradient_checkpointing"] = True
    ckpt = make_model(from_dict(d), tokenizer)
    assert ckpt.mllm.get_base_model().is_gradient_checkpointing
    loss_ckpt = ckpt(**batch, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for (n, a), (_, b) in zip(model.named_parameters(), ckpt.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_linear_projector_is_exactly_one_linear(model):
    proj = model.mllm.get_base_model().model.multi_modal_projector
    x = torch.randn(3, proj.linear_1.in_features)
    with torch.no_grad():
        assert torch.equal(proj(x), proj.linear_1(x))


def test_save_with_adapter_kept_is_exact(tmp_path, tiny_cfg, tokenizer):
    model = make_model(tiny_cfg, tokenizer, seed=3)
    with torch.no_grad():
        for _n, p in model.mllm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.save_pretrained(tmp_path / "c", merge_adapters=False)
    assert (tmp_path / "c" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = MGIEModel.from_pretrained(tmp_path / "c").eval()
    batch = make_batch(model)
    with torch.no_grad():
        l1, h1 = model.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        l2, h2 = loaded.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(l1, l2) and torch.equal(h1, h2)  # unmerged: bit-identical
    again = MGIEModel.from_pretrained(tmp_path / "c", adapters=True)
    assert len(again.trainable_groups()["lora"]) > 0  # the adapter comes back trainable


def test_full_mllm_training_mode(tiny_cfg, tokenizer):
    from mgie.config import from_dict, to_dict

    d = to_dict(tiny_cfg)
    d["model"]["mllm"]["trainable"] = "full"
    model = make_model(from_dict(d), tokenizer)
    groups = model.trainable_groups()
    assert groups["lora"] == groups["img_tokens"] == []
    frozen = {n for n, p in model.mllm.named_parameters() if not p.requires_grad}
    assert frozen == {
        "model.multi_modal_projector.linear_2.weight",
        "model.multi_modal_projector.linear_2.bias",
    }
    out = model(**make_batch(model), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    vision = model.mllm.model.vision_tower.encoder.layers[0].mlp.fc1.weight
    assert vision.grad is not None and vision.grad.abs().sum() > 0  # the vision tower learns too
