"""The predicted edit map (``model.edit_head.map_grid`` + ``unet.map_channels``, beyond the paper)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mgie.config import ConfigError, load_config, validate
from mgie.diffusion import build_unet, edit_map_target, guided_noise, unet_input
from mgie.edit_head import MapHead
from mgie.model import CheckpointError, MGIEModel
from mgie.pipeline import MGIEPipeline
from train.optim import param_groups

from .conftest import make_batch, make_model, random_image


def map_cfg(tiny_cfg, coord: int = 0, weight: float = 0.1, teacher: float = 0.5):
    """The tiny config with an edit map (grid 4) and optionally coordinates."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.edit_head.map_grid = 4
    u = cfg.model.diffusion.unet
    u.coord_channels, u.map_channels, u.in_channels = coord, 1, 9 + coord
    cfg.model.loss.map_weight, cfg.model.loss.map_teacher = weight, teacher
    validate(cfg)
    return cfg


def test_edit_map_target_marks_the_cells_that_change():
    """Independent count: one pixel moved past the tolerance marks its cell only; a smaller move
    (0.05 of the range, under CHANGE_TOL = 0.1) marks nothing."""
    src = torch.zeros(2, 3, 8, 8)
    tgt = src.clone()
    tgt[0, 1, 5, 2] = 0.3  # 0.15 of the [0, 1] range: row 5 -> cell row 2, column 2 -> cell 1
    tgt[1, :, :, :] = 0.1  # 0.05 everywhere
    got = edit_map_target(src, tgt, 4)  # (B, 1, 4, 4)
    want = torch.zeros(2, 1, 4, 4)
    want[0, 0, 2, 1] = 1
    assert torch.equal(got, want)


@pytest.mark.parametrize("coord", [0, 2])
def test_unet_input_appends_the_upsampled_map_last(tiny_cfg, coord):
    cfg = map_cfg(tiny_cfg, coord)
    unet = build_unet(cfg.model.diffusion.unet)
    x, src = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    emap = torch.rand(2, 1, 4, 4)
    got = unet_input(unet, x, src, emap)  # (B, 9 or 11, h, w)
    assert got.shape == (2, 9 + coord, 8, 8)
    assert torch.equal(got[:, :4], x) and torch.equal(got[:, 4:8], src)
    up = emap.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest, by hand
    assert torch.equal(got[:, -1:], up)
    assert torch.equal(unet_input(unet, x, src)[:, -1], torch.zeros(2, 8, 8))  # None: the null map
    with pytest.raises(ValueError, match="no input channel"):
        unet_input(build_unet(tiny_cfg.model.diffusion.unet), x, src, emap)


def test_guidance_gives_the_map_to_the_text_conditioned_third_only(tiny_cfg):
    cfg = map_cfg(tiny_cfg)
    unet = build_unet(cfg.model.diffusion.unet).eval()
    seen = []
    unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    emap = torch.rand(2, 1, 4, 4) + 0.1
    cond = torch.randn(2, 5, cfg.model.diffusion.unet.cross_attention_dim)
    with torch.no_grad():
        guided_noise(unet, torch.randn(2, 4, 8, 8), 10, torch.randn(2, 4, 8, 8), cond, cond, 2.0, 1.5, emap)
    full, img, none = seen[0][:, 8].chunk(3)  # (B, h, w) each
    assert torch.equal(full, F.interpolate(emap, size=(8, 8))[:, 0])
    assert not img.any() and not none.any()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"unet": {"map_channels": 1, "in_channels": 9}}, "go together"),
        ({"edit_head": {"map_grid": 4}}, "go together"),
        ({"edit_head": {"map_grid": 4}, "unet": {"map_channels": 1}}, "in_channels must be"),
        ({"edit_head": {"map_grid": 4}, "unet": {"map_channels": 2, "in_channels": 10}}, "0 or 1"),
        ({"loss": {"map_teacher": 1.5}}, "map_teacher"),
    ],
)
def test_config_refuses_inconsistent_map_settings(tiny_cfg, change, message):
    cfg = copy.deepcopy(tiny_cfg)
    for section, values in change.items():
        target = cfg.model.diffusion.unet if section == "unet" else getattr(cfg.model, section)
        for k, v in values.items():
            setattr(target, k, v)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_training_loss_adds_the_map_bce_and_feeds_the_true_map(tiny_cfg, tokenizer):
    """loss = lm + edit + map_weight * BCE(prediction, changed cells), recomputed here; with
    map_teacher 1 and no dropout the UNet reads the true map; the BCE reaches the map head and the
    MLLM's [IMG] embeddings, not the edit head (the map head reads the tokens, not its output)."""
    cfg = map_cfg(tiny_cfg, weight=0.3, teacher=1.0)
    cfg.model.loss.drop_text = cfg.model.loss.drop_both = cfg.model.loss.drop_image = 0.0
    model = make_model(cfg, tokenizer)
    batch = make_batch(model)
    batch["target"] = batch["source"].clone()
    batch["target"][:, :, 20:, :10] = -batch["target"][:, :, 20:, :10]  # a change in the bottom left
    seen = []
    model.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    w = cfg.model.loss
    truth = edit_map_target(batch["source"], batch["target"], 4)
    assert truth.sum() > 0 and truth.sum() < truth.numel()
    torch.testing.assert_close(
        out.loss, w.lm_weight * out.lm_loss + w.edit_weight * out.edit_loss + 0.3 * out.map_loss
    )
    with torch.no_grad():
        _, hidden = model.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        want = F.binary_cross_entropy_with_logits(
            torch.logit(model.edit_map(hidden, batch["input_ids"], batch["labels"] != -100)), truth
        )
    torch.testing.assert_close(out.map_loss, want, rtol=1e-4, atol=1e-5)
    h = seen[0].shape[-1]
    assert torch.equal(seen[0][:, 8:9], F.interpolate(truth, size=(h, h)))
    model.zero_grad()
    out.map_loss.backward()
    assert model.edit_head.map_head.inp.weight.grad.abs().sum() > 0
    assert model.edit_head.hid2feat.weight.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_groups()["img_tokens"])


def test_map_head_ignores_padding_and_learns_a_place_from_a_word():
    """Padded tokens do not change the map; 150 Adam steps learn "word A -> top left cell,
    word B -> bottom right" from the word's token alone, whatever tokens surround it."""
    torch.manual_seed(0)
    head = MapHead(llm_hidden=16, width=32, heads=4, grid=2)
    tokens, pad = torch.randn(2, 5, 16), torch.tensor([[False] * 3 + [True] * 2] * 2)
    other = tokens.clone()
    other[:, 3:] = torch.randn(2, 2, 16) * 100
    torch.testing.assert_close(head(tokens, pad), head(other, pad))
    words = torch.randn(2, 16)  # A, B
    want = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]]).view(2, 1, 2, 2)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(150):
        which = torch.randint(0, 2, (16,))
        x = torch.randn(16, 4, 16)
        x[torch.arange(16), torch.randint(0, 4, (16,))] = words[which]  # the word at a random place
        loss = F.binary_cross_entropy_with_logits(head(x), want[which])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(2, 4, 16)
    x[:, 1] = words
    assert torch.equal(torch.sigmoid(head(x)) > 0.5, want > 0.5)


def test_the_map_head_has_its_own_group_at_the_unet_rate(tiny_cfg, tokenizer):
    cfg = map_cfg(tiny_cfg)
    cfg.train.lr, cfg.train.lr_edit_head, cfg.train.lr_unet = 1e-3, 1e-5, 0.0
    model = make_model(cfg, tokenizer)
    groups = model.trainable_groups()
    assert {id(p) for p in groups["edit_map"]} == {id(p) for p in model.edit_head.map_head.parameters()}
    assert not {id(p) for p in groups["edit_map"]} & {id(p) for p in groups["edit_head"]}
    lrs = {g["name"]: g["lr"] for g in param_groups(groups, cfg)}
    assert lrs["edit_map"] == 1e-3 and lrs["edit_head"] == 1e-5


def test_a_map_model_saves_loads_and_edits(tmp_path, tiny_cfg, tokenizer):
    """The map head travels in edit_head.safetensors; the loaded pipeline predicts the same map
    and edits; a head file without the map head's weights is refused."""
    cfg = map_cfg(tiny_cfg)
    model = make_model(cfg, tokenizer, adapters=False)
    model.save_pretrained(tmp_path / "m")
    loaded = MGIEModel.from_pretrained(tmp_path / "m")
    images, ins = [random_image(32, 32, seed=1), random_image(32, 32, seed=2)], ["remove the red square"] * 2
    _, _, want = MGIEPipeline(model)._describe(images, ins)
    pipe = MGIEPipeline(loaded)
    _, _, got = pipe._describe(images, ins)
    assert got.shape == (2, 1, 4, 4)
    torch.testing.assert_close(got, want)
    assert pipe(images[:1], ins[:1], steps=2, progress=False).images[0].size == (32, 32)
    path = tmp_path / "m" / "edit_head.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("map_head.")}, path)
    with pytest.raises(CheckpointError, match="edit_head.safetensors"):
        MGIEModel.from_pretrained(tmp_path / "m")


def test_freeze_trains_the_map_head_alone_without_diffusion(tmp_path, tiny_cfg, tokenizer):
    """``train.freeze`` every other group and ``edit_weight`` 0: only the map head is trainable,
    the loss is map_weight x BCE (no UNet pass), and a step changes the map head only."""
    from train.run import build_model

    make_model(map_cfg(tiny_cfg), tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    cfg = map_cfg(load_config(tmp_path / "ckpt" / "config.yaml"), weight=2.0)
    cfg.model.loss.lm_weight, cfg.model.loss.edit_weight = 0.0, 0.0
    cfg.train.init_from = str(tmp_path / "ckpt")
    cfg.train.freeze = ["lora", "img_tokens", "mllm", "edit_head", "unet"]
    model = build_model(cfg)
    groups = model.trainable_groups()
    assert [k for k, v in groups.items() if v] == ["edit_map"]
    calls = []
    model.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    out = model(**make_batch(model), generator=torch.Generator().manual_seed(0))
    assert not calls and out.edit_loss == 0
    torch.testing.assert_close(out.loss, 2.0 * out.map_loss)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(groups["edit_map"], lr=0.1)
    out.loss.backward()
    opt.step()
    changed = {
        k.split(".")[0] + "." + k.split(".")[1]
        for k, v in model.state_dict().items()
        if not torch.equal(v, before[k])
    }
    assert changed == {"edit_head.map_head"}


def test_config_refuses_an_unknown_group_to_freeze(tiny_cfg, tmp_path):
    (tmp_path / "c.yaml").write_text("preset: tiny\ntrain:\n  freeze: [vae]\n")
    with pytest.raises(ConfigError, match="freeze"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("coord", [0, 2])
def test_training_starts_a_map_run_from_a_folder_without_one(tmp_path, tiny_cfg, tokenizer, coord):
    """``train.init_from`` an 8-channel folder, config asking for the map (and coordinates): the
    UNet is widened with zero weights, the head gains a fresh map MLP, and the model computes what
    the folder's did whatever the map holds."""
    from train.run import load_init_from

    make_model(tiny_cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    ref = MGIEModel.from_pretrained(tmp_path / "ckpt")
    cfg = map_cfg(load_config(tmp_path / "ckpt" / "config.yaml"), coord)
    cfg.train.init_from = str(tmp_path / "ckpt")
    model = load_init_from(cfg)
    assert model.unet.config.in_channels == 9 + coord and isinstance(model.edit_head.map_head, MapHead)
    g = torch.Generator().manual_seed(3)
    x, src = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 5, tiny_cfg.model.diffusion.unet.cross_attention_dim, generator=g)
    with torch.no_grad():
        got = model.unet(unet_input(model.unet, x, src, torch.rand(2, 1, 4, 4, generator=g)), 10, c).sample
        want = ref.unet(unet_input(ref.unet, x, src), 10, c).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "map")
    assert MGIEModel.from_pretrained(tmp_path / "map").cfg.model.edit_head.map_grid == 4


def test_training_keeps_a_fitting_map_head_and_replaces_another(tmp_path, tiny_cfg, tokenizer):
    """``train.init_from`` a folder with a map head: the same grid loads its weights; another grid
    gets a fresh head while the UNet (already 9-channel) and the rest load unchanged."""
    from train.run import load_init_from

    src = make_model(map_cfg(tiny_cfg), tokenizer, adapters=False)
    src.save_pretrained(tmp_path / "ckpt")
    cfg = load_config(tmp_path / "ckpt" / "config.yaml")
    cfg.train.init_from = str(tmp_path / "ckpt")
    same = load_init_from(cfg)
    for k, v in src.edit_head.state_dict().items():
        torch.testing.assert_close(same.edit_head.state_dict()[k], v)
    cfg.train.fresh_map_head = True  # the same grid, asked afresh: a new head, the rest as saved
    validate(cfg)
    renewed = load_init_from(cfg)
    for k, v in src.edit_head.state_dict().items():
        if k.startswith("map_head."):  # same shapes; the random draws differ (zero biases may not)
            assert renewed.edit_head.state_dict()[k].shape == v.shape
            if k in ("map_head.cells", "map_head.inp.weight", "map_head.out.weight"):
                assert not torch.equal(renewed.edit_head.state_dict()[k], v), k
        else:
            torch.testing.assert_close(renewed.edit_head.state_dict()[k], v)
    cfg.train.fresh_map_head = False
    cfg.model.edit_head.map_image = True  # the text-reading head reads the patches too: kept + positions
    reading = load_init_from(cfg)
    assert reading.edit_head.map_head.patch_pos.shape[1] > 0
    for k, v in src.edit_head.state_dict().items():
        torch.testing.assert_close(reading.edit_head.state_dict()[k], v)
    cfg.model.edit_head.map_image = False
    cfg.model.edit_head.map_grid = 2
    other = load_init_from(cfg)
    assert other.edit_head.map_head.grid == 2 and other.unet.config.in_channels == 9
    for k, v in src.unet.state_dict().items():
        torch.testing.assert_close(other.unet.state_dict()[k], v)
    for k, v in src.edit_head.state_dict().items():
        if not k.startswith("map_head."):
            torch.testing.assert_close(other.edit_head.state_dict()[k], v)


def test_fresh_unet_builds_another_design_and_loads_the_rest(tmp_path, tiny_cfg, tokenizer):
    """``train.fresh_unet``: a folder whose UNet has 8 attention heads starts a run whose UNet has
    2 (same parameter shapes, which plain loading refuses as another design): the UNet is a fresh,
    seeded draw of the config's design; the MLLM and the edit head (its map head too) load as saved."""
    from train.run import load_init_from

    src = make_model(map_cfg(tiny_cfg), tokenizer, adapters=False)
    src.save_pretrained(tmp_path / "ckpt")
    cfg = load_config(tmp_path / "ckpt" / "config.yaml")
    cfg.train.init_from = str(tmp_path / "ckpt")
    cfg.model.diffusion.unet.attention_head_dim = 2
    cfg.model.mllm.trainable, cfg.model.lora.enabled = "full", False  # as mgie-shapes: no fresh adapters
    with pytest.raises(CheckpointError, match="attention_head_dim"):
        load_init_from(cfg)
    cfg.train.fresh_unet = True
    validate(cfg)
    torch.manual_seed(0)
    model = load_init_from(cfg)
    torch.manual_seed(0)
    again = load_init_from(cfg)  # seeded as train/run.py seeds it: the same draw
    assert model.unet.config.attention_head_dim == 2 and model.unet.config.in_channels == 9
    for k, v in again.unet.state_dict().items():
        torch.testing.assert_close(model.unet.state_dict()[k], v)
    assert not torch.equal(model.unet.conv_in.weight, src.unet.conv_in.weight)
    for k, v in src.edit_head.state_dict().items():
        torch.testing.assert_close(model.edit_head.state_dict()[k], v)
    for k, v in src.mllm.state_dict().items():
        torch.testing.assert_close(model.mllm.state_dict()[k], v)
    cfg.train.init_from = ""
    with pytest.raises(ConfigError, match="fresh_unet"):
        validate(cfg)


def test_map_image_reads_the_patch_states_with_their_positions(tiny_cfg, tokenizer):
    """``edit_head.map_image``: the map head gets the last-layer states at the <im_patch> tokens
    (checked against their place in the prompt, after <im_start>), and their learned positions
    matter (the same patches in another order give another map)."""
    from mgie.mllm import num_patches

    cfg = map_cfg(tiny_cfg)
    cfg.model.edit_head.map_image = True
    validate(cfg)
    model = make_model(cfg, tokenizer)
    p = num_patches(cfg.model.mllm)
    assert model.edit_head.map_head.patch_pos.shape == (1, p, cfg.model.edit_head.hidden_size)
    batch = make_batch(model)
    seen = {}
    model.edit_head.map_head.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(
            patches=kwargs.get("patches", args[2] if len(args) > 2 else None)
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        _, hidden = model.mllm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        model.edit_map(hidden, batch["input_ids"], batch["labels"] != -100)
    for row, ids in enumerate(batch["input_ids"]):
        start = (ids == model.ids.im_start).nonzero().item() + 1
        torch.testing.assert_close(seen["patches"][row], hidden[row, start : start + p])
    head = model.edit_head.map_head
    tokens, patches = torch.randn(1, 3, hidden.shape[-1]), torch.randn(1, p, hidden.shape[-1])
    with torch.no_grad():
        a, b = head(tokens, patches=patches), head(tokens, patches=patches.flip(1))
    assert not torch.allclose(a, b)


def test_config_refuses_a_fresh_map_head_without_a_folder_or_a_map(tiny_cfg):
    cfg = map_cfg(tiny_cfg)
    cfg.train.fresh_map_head = True
    with pytest.raises(ConfigError, match="fresh_map_head"):
        validate(cfg)  # nothing to start from
    cfg.train.init_from = "somewhere"
    validate(cfg)
    plain = copy.deepcopy(tiny_cfg)
    plain.train.init_from, plain.train.fresh_map_head = "somewhere", True
    with pytest.raises(ConfigError, match="fresh_map_head"):
        validate(plain)  # no map to renew


def test_config_refuses_map_image_without_a_map(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.edit_head.map_image = True
    with pytest.raises(ConfigError, match="map_image"):
        validate(cfg)


def test_map_cells_find_the_named_object_in_the_patches():
    """``map_cells``: each cell reads the patch under it, so 300 Adam steps learn "the text names
    object A or B -> the cell that holds it", wherever the objects are; a head that reads the
    text alone cannot know where they are (checked on new scenes)."""

    def scenes(n, gen):
        patches = torch.randn(n, 4, 8, generator=gen) * 0.3  # a 2 x 2 grid of background patches
        where = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(n)])  # (n, 2) cells of A, B
        patches[torch.arange(n), where[:, 0]] += objects[0]
        patches[torch.arange(n), where[:, 1]] += objects[1]
        named = torch.randint(0, 2, (n,), generator=gen)
        tokens = words[named].unsqueeze(1)  # (n, 1, 8) the instruction: a single word
        want = F.one_hot(where[torch.arange(n), named], 4).float().view(n, 1, 2, 2)
        return tokens, patches, want

    torch.manual_seed(0)
    objects, words = torch.randn(2, 8) * 2, torch.randn(2, 8)
    gen = torch.Generator().manual_seed(1)
    accuracy = {}
    for cells in (True, False):
        head = MapHead(llm_hidden=8, width=32, heads=4, grid=2, cells=cells)
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(300):
            tokens, patches, want = scenes(32, gen)
            loss = F.binary_cross_entropy_with_logits(head(tokens, patches=patches), want)
            opt.zero_grad()
            loss.backward()
            opt.step()
        tokens, patches, want = scenes(200, gen)
        with torch.no_grad():
            picked = head(tokens, patches=patches).flatten(1).argmax(1)
        accuracy[cells] = (picked == want.flatten(1).argmax(1)).float().mean().item()
    assert accuracy[True] > 0.95 and accuracy[False] < 0.5, accuracy


def test_map_cells_pool_a_finer_patch_grid_to_the_map():
    """A 4 x 4 patch grid read by a 2 x 2 map: each cell gets the mean of its 2 x 2 patches."""
    head = MapHead(llm_hidden=3, width=8, heads=2, grid=2, cells=True)
    patches = torch.randn(2, 16, 3)  # row-major 4 x 4
    grid = patches.view(2, 4, 4, 3)
    want = torch.stack(
        [grid[:, r : r + 2, c : c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1
    )  # (2, 4, 3)
    torch.testing.assert_close(head.pool_patches(patches), want)
    torch.testing.assert_close(head.pool_patches(patches[:, :4]), patches[:, :4])  # same grid: as is


def test_config_refuses_map_cells_without_a_map(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.edit_head.map_cells = True
    with pytest.raises(ConfigError, match="map_cells"):
        validate(cfg)
