"""``python -m mgie.convert``: the foreign formats, proven exact on tiny models built in the official layouts.

The official sources are written here exactly as the release stores them (``torch.save`` pickles:
``mllm.pt`` with ``model.embed_tokens.weight``/``lm_head.weight``/``edit_head.*``/``emb``,
``unet.pt`` without prefix; the merged LLaVA-7B-v1 folder as two ``pytorch_model-0000i-of-00002.bin``
shards + index with LLaMA keys, ``model.mm_projector.*`` and ``rotary_emb.inv_freq`` buffers; a
``CLIPModel`` folder; a diffusers VAE folder). The official computation is re-typed in a few lines
(``official_forward``, ``OfficialEditMapper``: mgie_llava.py / demo.ipynb) as the reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mgie.convert import (
    ConversionError,
    llava_hf_config,
    llava_hf_plan,
    main,
    official_config,
    official_plan,
)
from mgie.model import MGIEModel
from mgie.tokens import SYSTEM, build_prompt, build_target, img_hidden_states

from .conftest import fixture_path, make_batch

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor:UserWarning")

HIDDEN, N_IMG, CLIP_HIDDEN, CROSS = 64, 8, 32, 32
HEAD = dict(
    hidden_size=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=1, ff_size=64, num_queries=16
)
UNET = dict(
    sample_size=8,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS,
)
VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    sample_size=32,
)
CLIP_VISION = dict(
    hidden_size=CLIP_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
)
HEAD_SET = ["--set", "model.edit_head.num_heads=2"]  # the one edit-head size shapes cannot tell


# ----------------------------------------------------------------------------- building sources


def tiny_sp_model(path: Path) -> Path:
    """A 512-piece LLaMA-layout SentencePiece model (the tiny preset's corpus and settings)."""
    from mgie.tokens import TINY_CORPUS_LINES, train_sentencepiece

    path.write_bytes(train_sentencepiece(TINY_CORPUS_LINES, 512))
    return path


def llama_config(vocab: int, hidden: int = HIDDEN):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def build_official(root: Path, sp_model: Path, hidden: int = HIDDEN, emb_offset: float = 0.0) -> dict:
    """Tiny sources in the official formats; returns their paths."""
    import sentencepiece as spm
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

    from mgie.config import EditHeadConfig
    from mgie.edit_head import EditHead

    base = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    torch.manual_seed(0)
    paths = {k: root / k for k in ("mgie", "llava", "clip", "vae", "unet_config")}
    for p in paths.values():
        p.mkdir(parents=True)

    # Merged LLaVA-7B-v1: LLaMA keys + mm_projector + rotary buffers, fp16, two .bin shards + index.
    llama = LlamaForCausalLM(llama_config(base + 3, hidden))
    sd = {k: v.half() for k, v in llama.state_dict().items()}
    sd["model.mm_projector.weight"] = (torch.randn(hidden, CLIP_HIDDEN) * 0.1).half()
    sd["model.mm_projector.bias"] = (torch.randn(hidden) * 0.1).half()
    head_dim = hidden // 4
    for i in range(2):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        )
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2]}
    shards["pytorch_model-00002-of-00002.bin"] = keys[len(keys) // 2 :]
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, paths["llava"] / name)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (paths["llava"] / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    llava_cfg = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": 0,  # the early LLaMA conversion's values: ignored, the tokenizer decides
        "eos_token_id": 1,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "max_sequence_length": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": base + 3,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "mm_hidden_size": CLIP_HIDDEN,
        "mm_vision_select_layer": -2,
        "mm_use_im_start_end": True,
        "use_mm_proj": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    (paths["llava"] / "config.json").write_text(json.dumps(llava_cfg))
    shutil.copyfile(sp_model, paths["llava"] / "tokenizer.model")
    added = {"<im_patch>": base, "<im_start>": base + 1, "<im_end>": base + 2}
    (paths["llava"] / "added_tokens.json").write_text(json.dumps(added))

    # mllm.pt: the trained full embed_tokens / lm_head (+8 [IMG] rows), the edit head, and emb.
    embed = torch.cat([sd["model.embed_tokens.weight"].float() + 0.01, torch.randn(N_IMG, hidden) * 0.02])
    with torch.no_grad():
        head = EditHead(EditHeadConfig(**HEAD), hidden, CROSS)
    mllm = {
        "model.embed_tokens.weight": embed.half(),
        "lm_head.weight": (torch.randn(base + 3 + N_IMG, hidden) * 0.02).half(),
        **{f"edit_head.{k}": v.half() for k, v in head.state_dict().items()},
    }
    mllm["emb"] = (mllm["model.embed_tokens.weight"][-N_IMG:].float() + emb_offset).half().unsqueeze(0)
    torch.save(mllm, paths["mgie"] / "mllm.pt")

    unet = UNet2DConditionModel(in_channels=8, **UNET)
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, paths["mgie"] / "unet.pt")
    unet.save_config(paths["unet_config"])
    UNet2DConditionModel(in_channels=4, **UNET).save_pretrained(root / "sd_unet")  # for llava-v1
    paths["sd_unet"] = root / "sd_unet"

    clip_cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=CLIP_VISION,
        projection_dim=16,
    )
    CLIPModel(clip_cfg).save_pretrained(paths["clip"])
    AutoencoderKL(**VAE).save_pretrained(paths["vae"])
    return paths


def convert_official(paths: dict, out: Path, *extra: str) -> int:
    return main(
        [
            "official",
            "--mgie",
            str(paths["mgie"]),
            "--llava",
            str(paths["llava"]),
            "--clip",
            str(paths["clip"]),
            "--vae",
            str(paths["vae"]),
            "--unet-config",
            str(paths["unet_config"]),
            "--out",
            str(out),
            "--quiet",
            *HEAD_SET,
            *extra,
        ]
    )


# ----------------------------------------------------------------------------- the reference


class OfficialEditMapper(nn.Module):
    """mgie_llava.py ``EditMapper`` with its hard-coded sizes as arguments."""

    def __init__(self, llm, hid, nhead, enc, dec, ff, queries, feat):
        super().__init__()
        self.llm2hid = nn.Linear(llm, hid)
        self.query = nn.Parameter(torch.randn(1, queries, hid))
        self.mapper = nn.Transformer(
            batch_first=True,
            norm_first=True,
            d_model=hid,
            nhead=nhead,
            num_encoder_layers=enc,
            num_decoder_layers=dec,
            dim_feedforward=ff,
            dropout=0.0,
        )
        self.hid2feat = nn.Linear(hid, feat)

    def forward(self, llm, emb):
        hid = self.llm2hid(llm + emb)
        hid = self.mapper(hid, self.query.repeat(llm.shape[0], 1, 1))
        return self.hid2feat(hid)


def llava_v1_state(paths: dict) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(paths["llava"].glob("pytorch_model-*.bin")):
        sd.update(torch.load(f, weights_only=True))
    return sd


@torch.no_grad()
def llava_v1_forward(paths, embed, head, input_ids, pixel_values, im_patch):
    """LLaVA-v1 (mgie_llava.py ``LlavaLlamaModel.forward``) on the official files, in fp32:
    CLIP ``hidden_states[-2][:, 1:]`` -> ``mm_projector`` -> spliced at ``<im_patch>`` -> LLaMA."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    llava = llava_v1_state(paths)
    llama = LlamaForCausalLM(llama_config(embed.shape[0], embed.shape[1])).eval()
    state = {k: v.float() for k, v in llava.items() if "rotary_emb" not in k and "mm_projector" not in k}
    state.update({"model.embed_tokens.weight": embed.float(), "lm_head.weight": head.float()})
    llama.load_state_dict(state)  # the official resize + load_state_dict(mllm.pt), made strict
    tower = CLIPVisionModel.from_pretrained(paths["clip"]).eval()  # demo.ipynb re-creates it like this
    feats = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    proj = feats @ llava["model.mm_projector.weight"].float().T + llava["model.mm_projector.bias"].float()
    embeds = llama.model.embed_tokens(input_ids).clone()
    embeds[input_ids == im_patch] = proj.reshape(-1, proj.shape[-1])  # the <im_patch> splice
    hidden = llama.model(inputs_embeds=embeds).last_hidden_state
    return hidden, llama.lm_head(hidden)


@torch.no_grad()
def official_forward(paths: dict, input_ids: torch.Tensor, pixel_values: torch.Tensor, im_patch: int):
    """The official MLLM + edit head on the official files (fp32): hidden, logits, [IMG] states, cond, null."""
    mllm = torch.load(paths["mgie"] / "mllm.pt", weights_only=True)
    embed, head = mllm["model.embed_tokens.weight"], mllm["lm_head.weight"]
    hidden, logits = llava_v1_forward(paths, embed, head, input_ids, pixel_values, im_patch)
    p = input_ids[0].tolist().index(embed.shape[0] - N_IMG) - 1  # index([IMG0]) - 1
    h = hidden[:, p : p + N_IMG]
    mapper = OfficialEditMapper(
        h.shape[-1],
        HEAD["hidden_size"],
        HEAD["num_heads"],
        HEAD["num_encoder_layers"],
        HEAD["num_decoder_layers"],
        HEAD["ff_size"],
        HEAD["num_queries"],
        CROSS,
    ).eval()
    mapper.load_state_dict(
        {k[len("edit_head.") :]: v.float() for k, v in mllm.items() if k.startswith("edit_head.")}
    )
    emb = mllm["emb"].float()
    return dict(
        hidden=hidden,
        logits=logits,
        img_states=h,
        cond=mapper(h, emb),
        null=mapper(torch.zeros(1, N_IMG, h.shape[-1]), emb),
    )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    paths = build_official(root / "src", tiny_sp_model(root / "tokenizer.model"))
    out = root / "converted"
    assert convert_official(paths, out, "--max-shard-size", "40KB") == 0
    return paths, out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----------------------------------------------------------------------------- official: fidelity


def test_official_conversion_reproduces_the_official_computation(official):
    paths, out = official
    assert len(list((out / "mllm").glob("model-*-of-*.safetensors"))) > 1  # streamed in several shards
    model = MGIEModel.from_pretrained(out).eval()  # strict: every key present, every shape fits
    tok, ids = model.tokenizer, model.ids
    assert (ids.im_patch, ids.im_start, ids.im_end, ids.img) == (512, 513, 514, tuple(range(515, 523)))
    prompt = build_prompt(tok, ids, "make it look like night", 16)
    seq = torch.tensor([prompt + build_target(tok, ids, "the sky turns dark with stars")])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = official_forward(paths, seq, pixels, ids.im_patch)
    with torch.no_grad():
        logits, hidden = model.mllm_forward(seq, torch.ones_like(seq), pixels)
        cond = model.condition(hidden, seq)
        null = model.null_condition()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, ref["hidden"], **tol)
    torch.testing.assert_close(logits, ref["logits"], **tol)
    torch.testing.assert_close(img_hidden_states(hidden, seq, ids.img), ref["img_states"], **tol)
    torch.testing.assert_close(cond, ref["cond"], **tol)  # E = emb (= the [IMG] rows)
    torch.testing.assert_close(null, ref["null"], **tol)
    emb = torch.load(paths["mgie"] / "mllm.pt", weights_only=True)["emb"].float()[0]
    assert torch.equal(model.img_embeddings(), emb)


def test_official_unet_and_vae_are_the_released_ones(official):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    paths, out = official
    model = MGIEModel.from_pretrained(out).eval()
    ref = UNet2DConditionModel.from_config(json.loads((paths["unet_config"] / "config.json").read_text()))
    ref.load_state_dict(torch.load(paths["mgie"] / "unet.pt", weights_only=True))  # as demo.ipynb does
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 16, CROSS, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, encoder_hidden_states=c).sample, ref.eval()(x, t, c).sample)
        vae = AutoencoderKL.from_pretrained(paths["vae"]).eval()
        img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        assert torch.equal(model.vae.encode(img).latent_dist.mode(), vae.encode(img).latent_dist.mode())
    # Every weight is stored as the source stored it (fp16 release, fp32 CLIP/VAE): bit-exact.
    from safetensors.torch import load_file

    unet_pt = torch.load(paths["mgie"] / "unet.pt", weights_only=True)
    written = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == unet_pt.keys() and all(torch.equal(written[k], unet_pt[k]) for k in written)
    notes = json.loads((out / "conversion.json").read_text())
    assert notes["img_embeddings"]["E"].startswith("embed_tokens rows")
    assert notes["ignored_source_keys"] == {"llava": 2, "clip": len(_clip_text_keys(paths["clip"]))}


def _clip_text_keys(clip_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(clip_dir / "model.safetensors"), "pt") as f:
        return [k for k in f.keys() if not k.startswith("vision_model.")]


def test_clip_vision_model_folder_gives_the_same_tower(official, tmp_path):
    """A CLIPVisionModel folder (transformers 5 writes bare keys) converts to the same weights."""
    from transformers import CLIPVisionModel

    paths, out = official
    vision = dict(paths, clip=tmp_path / "clip_vision")
    CLIPVisionModel.from_pretrained(paths["clip"]).save_pretrained(vision["clip"])
    assert convert_official(vision, tmp_path / "c2") == 0
    from safetensors.torch import load_file

    def tower(folder):
        sd = {}
        for f in (folder / "mllm").glob("*.safetensors"):
            sd.update(load_file(f))
        return {k: v for k, v in sd.items() if "vision_tower" in k}

    a, b = tower(out), tower(tmp_path / "c2")
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- official: emb


def test_emb_that_differs_from_the_img_rows_is_refused_then_chosen(tmp_path, capsys):
    paths = build_official(tmp_path / "src", tiny_sp_model(tmp_path / "tokenizer.model"), emb_offset=0.25)
    capsys.readouterr()
    assert convert_official(paths, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert "emb differs" in line and "--img-embeddings" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()

    assert convert_official(paths, tmp_path / "e", "--img-embeddings", "emb") == 0
    assert "warning:" in capsys.readouterr().err
    mllm = torch.load(paths["mgie"] / "mllm.pt", weights_only=True)
    model = MGIEModel.from_pretrained(tmp_path / "e")
    assert torch.equal(model.img_embeddings(), mllm["emb"].float()[0])  # E exact
    assert convert_official(paths, tmp_path / "t", "--img-embeddings", "embed_tokens") == 0
    model = MGIEModel.from_pretrained(tmp_path / "t")
    rows = mllm["model.embed_tokens.weight"].float()[-N_IMG:]
    assert torch.equal(model.img_embeddings(), rows)  # LLM input exact


# ----------------------------------------------------------------------------- official: bad input


def _variant(paths: dict, tmp: Path, name: str) -> dict:
    """A copy of one source folder (the others shared) to damage."""
    new = dict(paths)
    new[name] = tmp / name
    shutil.copytree(paths[name], new[name])
    return new


def test_leftover_key_is_an_error_listing_it(official, tmp_path, capsys):
    paths = _variant(official[0], tmp_path, "mgie")
    mllm = torch.load(paths["mgie"] / "mllm.pt", weights_only=True)
    mllm["model.extra_adapter.weight"] = torch.zeros(2, 2)
    torch.save(mllm, paths["mgie"] / "mllm.pt")
    assert convert_official(paths, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert "unexpected source keys" in line and "mllm.pt:model.extra_adapter.weight" in line


def test_missing_key_is_an_error_listing_it(official, tmp_path, capsys):
    paths = _variant(official[0], tmp_path, "llava")
    index = json.loads((paths["llava"] / "pytorch_model.bin.index.json").read_text())
    shard = paths["llava"] / index["weight_map"]["model.norm.weight"]
    sd = torch.load(shard, weights_only=True)
    del sd["model.norm.weight"]
    torch.save(sd, shard)
    assert convert_official(paths, tmp_path / "out") == 2
    assert "missing source keys: llava:model.norm.weight" in _one_error_line(capsys)


def test_wrong_shape_is_an_error(official, tmp_path, capsys):
    paths = _variant(official[0], tmp_path, "llava")
    index = json.loads((paths["llava"] / "pytorch_model.bin.index.json").read_text())
    shard = paths["llava"] / index["weight_map"]["model.mm_projector.weight"]
    sd = torch.load(shard, weights_only=True)
    sd["model.mm_projector.weight"] = sd["model.mm_projector.weight"][:, :-1].clone()
    torch.save(sd, shard)
    assert convert_official(paths, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert "shape mismatch" in line and "llava:model.mm_projector.weight gives (64, 31)" in line


def test_sha256_is_checked(official, tmp_path, capsys):
    from mgie.convert import sha256_file

    paths = official[0]
    mllm = paths["mgie"] / "mllm.pt"
    assert convert_official(paths, tmp_path / "out", "--sha256", f"{mllm}={'0' * 64}") == 2
    assert "sha256 mismatch" in _one_error_line(capsys)
    ok = ["--sha256", f"{mllm}={sha256_file(mllm)}", "--dtype", "bfloat16", "--verify"]
    assert convert_official(paths, tmp_path / "ok", *ok) == 0
    notes = json.loads((tmp_path / "ok" / "conversion.json").read_text())
    assert notes["sha256_checked"] == [{"path": str(mllm), "sha256": sha256_file(mllm)}]
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(tmp_path / "ok" / "edit_head.safetensors").values()} == {
        torch.bfloat16
    }


def test_missing_folder_wrong_file_and_existing_output(official, tmp_path, capsys):
    paths, out = official
    assert convert_official(dict(paths, clip=tmp_path / "nope"), tmp_path / "a") == 2
    assert "CLIP folder not found" in _one_error_line(capsys)
    bad = _variant(paths, tmp_path, "mgie")
    (bad["mgie"] / "mllm.pt").write_text("not a checkpoint")
    assert convert_official(bad, tmp_path / "b") == 2
    assert "not a PyTorch state dict" in _one_error_line(capsys)
    assert convert_official(paths, out) == 2  # never replaces a folder silently
    assert "--overwrite" in _one_error_line(capsys)
    assert convert_official(paths, out, "--overwrite") == 0


def test_module_entry_point_exits_2_with_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mgie.convert", "official", "--mgie", str(tmp_path / "x"), "--llava", "y"]
        + ["--clip", "z", "--vae", "v", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: MGIE release (mllm.pt, unet.pt) folder not found: {tmp_path / 'x'}"
    ]


# ----------------------------------------------------------------------------- llava-v1 (untrained MGIE-7B)


def test_llava_v1_gives_the_paper_starting_point(official, tmp_path):
    """LLaVA-7B-v1 + CLIP + an SD-style 4-channel UNet: the LLM is LLaVA's exactly, the UNet is
    widened as mgie.diffusion.widen_conv_in does, and the folder trains."""
    from diffusers import UNet2DConditionModel

    from mgie.diffusion import widen_conv_in

    paths = official[0]
    argv = ["llava-v1", "--llava", str(paths["llava"]), "--clip", str(paths["clip"])]
    argv += ["--unet", str(paths["sd_unet"]), "--vae", str(paths["vae"]), "--out", str(tmp_path / "init")]
    assert main([*argv, "--quiet", *SMALL_HEAD]) == 0
    model = MGIEModel.from_pretrained(tmp_path / "init").eval()
    tok, ids = model.tokenizer, model.ids
    assert (ids.im_patch, ids.img) == (512, tuple(range(515, 523)))
    llava = llava_v1_state(paths)
    embed, head = llava["model.embed_tokens.weight"], llava["lm_head.weight"]
    seq = torch.tensor([build_prompt(tok, ids, "make it look like night", 16)])  # no [IMG] token yet
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ref_hidden, ref_logits = llava_v1_forward(paths, embed, head, seq, pixels, ids.im_patch)
    with torch.no_grad():
        logits, hidden = model.mllm_forward(seq, torch.ones_like(seq), pixels)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[..., : embed.shape[0]], ref_logits, rtol=1e-5, atol=1e-5)
    new_rows = model.mllm.get_input_embeddings().weight[embed.shape[0] :]
    torch.testing.assert_close(new_rows, embed.float().mean(0, keepdim=True).expand(N_IMG, -1))

    src_unet = UNet2DConditionModel.from_pretrained(paths["sd_unet"])
    wide = widen_conv_in(src_unet, 8)
    assert all(
        torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), wide.state_dict().values())
    )

    train = MGIEModel.from_pretrained(tmp_path / "init", adapters=True)
    out = train(**make_batch(train, n=2), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(
        train.trainable_groups()[g] for g in ("img_tokens", "edit_head", "unet")
    )


# ----------------------------------------------------------------------------- prompt fidelity


@pytest.fixture(scope="module")
def converted_llama_tokenizer(tmp_path_factory):
    """The tokenizer the converter saved for a LLaVA folder holding the real LLaMA tokenizer.model."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp_model = fixture_path("llama_tokenizer", "tokenizer.model")
    root = tmp_path_factory.mktemp("llama")
    paths = build_official(root / "src", sp_model, hidden=16)
    assert convert_official(paths, root / "out") == 0
    tok = AutoTokenizer.from_pretrained(root / "out" / "tokenizer")
    return tok, spm.SentencePieceProcessor(model_file=str(sp_model))


@pytest.mark.parametrize("i", range(20))
def test_converted_tokenizer_gives_the_official_prompt_ids(converted_llama_tokenizer, i):
    from mgie.tokens import token_ids

    tok, sp = converted_llama_tokenizer
    ids = token_ids(tok, N_IMG)
    assert (ids.im_patch, ids.im_start, ids.im_end, ids.img) == (
        32000,
        32001,
        32002,
        tuple(range(32003, 32011)),
    )
    instruction = json.loads(fixture_path("photos", "instructions.json").read_text())[i]["instruction"]
    user = f"{SYSTEM} USER: what will this image be like if '{instruction}'"
    expected = [1] + sp.encode(user) + [32001] + [32000] * 256 + [32002] + sp.encode("ASSISTANT:")
    assert build_prompt(tok, ids, instruction, 256) == expected


# ----------------------------------------------------------------------------- full size, shapes only


def _meta_shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


SD15_VAE_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
IP2P_UNET_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}


def _sd15(in_channels: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # diffusers' defaults are SD-1.5's, apart from these
        unet = UNet2DConditionModel(sample_size=64, in_channels=in_channels, cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae_shapes = {}
    for k, s in _meta_shapes(vae).items():  # the pre-0.14 attention names the SD-1.5 VAE files use
        for new, o in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        vae_shapes[k] = s
    return _meta_shapes(unet), vae_shapes


def _assert_meta_model_accepts(plan, cfg):
    """The plan's keys and shapes are exactly the meta model's, and a strict assign-load accepts them."""
    with torch.device("meta"):
        model = MGIEModel.from_config(cfg, adapters=False)
    got = plan.shapes()
    for part, module in (
        ("mllm", model.mllm),
        ("edit_head", model.edit_head),
        ("unet", model.unet),
        ("vae", model.vae),
    ):
        assert got[part] == _meta_shapes(module), part
        module.load_state_dict(
            {k: torch.empty(s, device="meta") for k, s in got[part].items()}, strict=True, assign=True
        )


def official_full_size() -> tuple[dict, dict, dict]:
    """LLaVA-7B-v1 config.json, the CLIP-L vision config and every official key -> shape (meta, no data)."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    from mgie.config import EditHeadConfig
    from mgie.edit_head import EditHead

    llava_json = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "max_sequence_length": 2048,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": 32003,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "mm_hidden_size": 1024,
        "mm_vision_select_layer": -2,
        "mm_use_im_start_end": True,
        "use_mm_proj": True,
    }
    clip_cfg = CLIPConfig(
        text_config=dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12
        ),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
        ),
        projection_dim=768,
    )
    with torch.device("meta"):
        llama = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                vocab_size=32003,
            )
        )
        clip = CLIPModel(clip_cfg)
        head = EditHead(EditHeadConfig(), 4096, 768)
    llava = _meta_shapes(llama)
    llava.update({"model.mm_projector.weight": (4096, 1024), "model.mm_projector.bias": (4096,)})
    llava.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (64,) for i in range(32)})
    clip_shapes = _meta_shapes(clip)
    clip_shapes.update(
        {"text_model.embeddings.position_ids": (1, 77), "vision_model.embeddings.position_ids": (1, 257)}
    )
    mllm = {"model.embed_tokens.weight": (32011, 4096), "lm_head.weight": (32011, 4096), "emb": (1, 8, 4096)}
    mllm.update(_meta_shapes(head, "edit_head."))
    unet, vae = _sd15(8)
    shapes = {"mllm.pt": mllm, "unet.pt": unet, "llava": llava, "clip": clip_shapes, "vae": vae}

    return llava_json, clip_cfg.vision_config.to_dict(), shapes


def test_full_size_official_key_set_maps_onto_the_paper_preset():
    from mgie.config import to_dict
    from mgie.presets import mgie_7b

    llava_json, vision, shapes = official_full_size()
    assert shapes["unet.pt"]["conv_in.weight"] == (320, 8, 3, 3)
    assert shapes["llava"]["model.embed_tokens.weight"] == (32003, 4096)
    cfg = official_config(llava_json, vision, shapes, IP2P_UNET_JSON, SD15_VAE_JSON)
    assert to_dict(cfg.model) == to_dict(mgie_7b().model)  # every derived size is the paper's
    plan = official_plan(shapes, cfg)
    _assert_meta_model_accepts(plan, cfg)
    assert len(plan.ignored["llava"]) == 32  # the rotary buffers
    assert all(
        k.startswith(("text_", "visual_", "logit_")) or k.endswith("position_ids")
        for k in plan.ignored["clip"]
    )
    assert plan.parts["mllm"]["model.multi_modal_projector.linear_2.weight"].what == "identity"


def test_full_size_llava_v1_init_is_the_paper_preset():
    """LLaVA-7B-v1 + CLIP-L + the SD-1.5 UNet (4 channels, widened): exactly ``mgie-7b``."""
    from mgie.config import to_dict
    from mgie.convert import llava_v1_config, llava_v1_plan
    from mgie.presets import mgie_7b

    llava_json, vision, shapes = official_full_size()
    unet, vae = _sd15(4)
    src = {"llava": shapes["llava"], "clip": shapes["clip"], "unet": unet, "vae": vae}
    cfg = llava_v1_config(llava_json, vision, src, dict(IP2P_UNET_JSON, in_channels=4), SD15_VAE_JSON)
    assert to_dict(cfg.model) == to_dict(mgie_7b().model)
    plan = llava_v1_plan(src, cfg)
    _assert_meta_model_accepts(plan, cfg)
    assert plan.shapes()["mllm"]["lm_head.weight"] == (32011, 4096)
    assert plan.parts["unet"]["conv_in.weight"].what == "widen to 8 channels"


def test_full_size_llava15_hf_key_set_maps_onto_an_mgie_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mgie.mllm import llava_config

    src = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
            image_size=336,
        ),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        image_token_id=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(src)
    hub = {}  # the key style of the llava-hf/llava-1.5-7b-hf files (transformers 4.36)
    for k, s in _meta_shapes(llava).items():
        k = k.replace("model.language_model.", "language_model.model.").replace(
            "lm_head.", "language_model.lm_head."
        )
        k = k.replace("model.vision_tower.", "vision_tower.vision_model.").replace(
            "model.multi_modal_projector.", "multi_modal_projector."
        )
        hub[k] = s
    unet, vae = _sd15(4)
    sd15_unet_json = dict(IP2P_UNET_JSON, in_channels=4)
    cfg = llava_hf_config(src, sd15_unet_json, SD15_VAE_JSON)
    plan = llava_hf_plan({"llava-hf": hub, "unet": unet, "vae": vae}, cfg)
    _assert_meta_model_accepts(plan, cfg)
    m = cfg.model.mllm
    assert (m.text.vocab_size, m.projector, m.vision.image_size, m.vision.patch_size) == (
        32064,
        "mlp2x_gelu",
        336,
        14,
    )
    assert llava_config(m).image_seq_length == 576
    assert plan.shapes()["mllm"]["lm_head.weight"] == (32064 + 11, 4096)
    assert plan.shapes()["unet"]["conv_in.weight"] == (320, 8, 3, 3)


def test_pure_plan_reports_problems_by_source_key():
    llava_json, vision, shapes = official_full_size()
    cfg = official_config(llava_json, vision, shapes, IP2P_UNET_JSON, SD15_VAE_JSON)

    def damaged(group, drop=None, add=None):
        new = {g: dict(s) for g, s in shapes.items()}
        if drop:
            del new[group][drop]
        new[group].update(add or {})
        return new

    with pytest.raises(ConversionError, match=r"missing source keys: llava:model\.norm\.weight"):
        official_plan(damaged("llava", drop="model.norm.weight"), cfg)
    with pytest.raises(ConversionError, match=r"unexpected source keys.*unet\.pt:foo"):
        official_plan(damaged("unet.pt", add={"foo": (1,)}), cfg)  # not a UNet key: no place in MGIE
    with pytest.raises(ConversionError, match=r"clip:vision_model\.post_layernorm\.weight gives \(1023,\)"):
        official_plan(damaged("clip", add={"vision_model.post_layernorm.weight": (1023,)}), cfg)
    with pytest.raises(ConversionError, match=r"mllm\.pt:emb has shape \(1, 7, 4096\)"):
        official_plan(damaged("mllm.pt", add={"emb": (1, 7, 4096)}), cfg)
    with pytest.raises(ConversionError, match="mm_use_im_start_end"):
        official_config(dict(llava_json, mm_use_im_start_end=False), vision, shapes)


# ----------------------------------------------------------------------------- llava-hf


def build_llava_hf(root: Path, sp_model: Path, key_style: str, unet_in: int = 4):
    """A tiny llava-hf folder (+ ``<image>``, ``<pad>``, vocab padded to 576), an SD-style UNet, a VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mgie.convert import llama_tokenizer

    torch.manual_seed(3)
    src, unet_dir, vae_dir = root / "llava", root / "unet", root / "vae"
    tok = llama_tokenizer(sp_model)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_VISION),
        text_config=LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=576,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            pad_token_id=513,
        ),
        image_token_id=512,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(src)
    tok.save_pretrained(src)
    shutil.copyfile(sp_model, src / "tokenizer.model")
    if key_style != "saved":
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if key_style == "hub":  # llava-hf/llava-1.5-7b-hf as written by transformers 4.36
            rename = [
                ("model.language_model.", "language_model.model."),
                ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
            ]
            for a, b in rename:
                sd = {(b + k[len(a) :] if k.startswith(a) else k): v for k, v in sd.items()}
            sd["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert set(load_file(src / "model.safetensors")) != set() and (src / "tokenizer.model").is_file()
    unet = UNet2DConditionModel(in_channels=unet_in, **UNET).eval()
    unet.save_pretrained(unet_dir)
    AutoencoderKL(**VAE).save_pretrained(vae_dir)
    return model, unet, dict(llava=src, unet=unet_dir, vae=vae_dir)


SMALL_HEAD = [
    "--set",
    "model.edit_head.hidden_size=32",
    "--set",
    "model.edit_head.num_heads=2",
    "--set",
    "model.edit_head.num_encoder_layers=1",
    "--set",
    "model.edit_head.num_decoder_layers=1",
    "--set",
    "model.edit_head.ff_size=64",
    "--set",
    "model.edit_head.num_queries=16",
    "--set",
    "model.lora.r=4",
]


def convert_llava_hf(paths: dict, out: Path, *extra: str) -> int:
    argv = [
        "llava-hf",
        "--llava",
        str(paths["llava"]),
        "--unet",
        str(paths["unet"]),
        "--vae",
        str(paths["vae"]),
    ]
    return main([*argv, "--out", str(out), "--quiet", *SMALL_HEAD, *extra])


@pytest.mark.parametrize("key_style", ["saved", "hub"])
def test_llava_hf_gives_a_loadable_trainable_start_that_keeps_the_llm(tmp_path, key_style):
    from mgie.diffusion import widen_conv_in

    sp_model = tiny_sp_model(tmp_path / "tokenizer.model")
    src_model, src_unet, paths = build_llava_hf(tmp_path / "src", sp_model, key_style)
    assert convert_llava_hf(paths, tmp_path / "out") == 0
    model = MGIEModel.from_pretrained(tmp_path / "out").eval()
    m = model.cfg.model.mllm
    assert (m.text.vocab_size, m.projector, m.num_img_tokens) == (576, "mlp2x_gelu", 8)
    tok, ids = model.tokenizer, model.ids
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [512, 513] and ids.pad == 513
    assert (ids.im_patch, ids.img) == (576, tuple(range(579, 587)))

    # Text-only input never touches the new rows: the LLM computes what the source computes.
    text = torch.tensor([tok.encode("make the sky blue and add a green circle")])
    with torch.no_grad():
        ours = model.mllm(input_ids=text, output_hidden_states=True)
        theirs = src_model(input_ids=text, output_hidden_states=True)
    torch.testing.assert_close(ours.logits[..., :576], theirs.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1], rtol=1e-6, atol=1e-6)
    for new, old in ((model.mllm.get_input_embeddings().weight, src_model.get_input_embeddings().weight),):
        assert torch.equal(new[:576], old)
        torch.testing.assert_close(new[576:], old.mean(0, keepdim=True).expand(11, -1))
    assert torch.equal(model.mllm.lm_head.weight[:576], src_model.lm_head.weight)

    # The SD-style 4-channel UNet is widened exactly as mgie.diffusion.widen_conv_in does it.
    wide = widen_conv_in(src_unet, 8)
    assert all(
        torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), wide.state_dict().values())
    )
    x, z = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    c, t = torch.randn(1, 16, CROSS), torch.tensor([100])
    with torch.no_grad():
        torch.testing.assert_close(
            model.unet(torch.cat([x, z], 1), t, c).sample, model.unet(torch.cat([x, 0 * z], 1), t, c).sample
        )

    # A training starting point: adapters attach, both losses are finite and reach the trainable parts.
    train = MGIEModel.from_pretrained(tmp_path / "out", adapters=True)
    out = train(**make_batch(train, n=2), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    groups = train.trainable_groups()
    assert all(groups[g] for g in ("img_tokens", "edit_head", "unet"))
    for group, params in groups.items():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), group


def test_llava_hf_with_an_8_channel_ip2p_unet_keeps_it_as_is(tmp_path):
    from safetensors.torch import load_file

    sp_model = tiny_sp_model(tmp_path / "tokenizer.model")
    _, src_unet, paths = build_llava_hf(tmp_path / "src", sp_model, "saved", unet_in=8)
    assert convert_llava_hf(paths, tmp_path / "out", "--seed", "7") == 0
    written = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in src_unet.state_dict().items())
    notes = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert notes["edit_head_seed"] == 7 and not any("widened" in n for n in notes["notes"])
    a = load_file(tmp_path / "out" / "edit_head.safetensors")
    assert convert_llava_hf(paths, tmp_path / "again", "--seed", "7") == 0
    b = load_file(tmp_path / "again" / "edit_head.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fresh head is reproducible from its seed


def test_llava_hf_route_refuses_a_llava_v1_folder(official, tmp_path, capsys):
    paths = official[0]
    argv = [
        "llava-hf",
        "--llava",
        str(paths["llava"]),
        "--unet",
        str(paths["unet_config"]),
        "--vae",
        str(paths["vae"]),
    ]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "not a llava-hf config" in _one_error_line(capsys)
