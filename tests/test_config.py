from pathlib import Path

import pytest

from mgie.config import ConfigError, MGIEConfig, from_dict, load_config, parse_override, save_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_architecture():
    m = MGIEConfig().model
    assert (m.mllm.text.hidden_size, m.mllm.text.num_hidden_layers, m.mllm.num_img_tokens) == (4096, 32, 8)
    assert (m.mllm.vision.image_size, m.mllm.vision.patch_size, m.mllm.vision_feature_layer) == (224, 14, -2)
    assert (m.edit_head.hidden_size, m.edit_head.num_queries, m.diffusion.unet.in_channels) == (512, 77, 8)
    assert (m.loss.lm_weight, m.loss.edit_weight) == (1.0, 0.5)
    inf = MGIEConfig().inference
    assert (inf.steps, inf.guidance, inf.image_guidance, inf.scheduler) == (100, 7.5, 1.5, "euler_ancestral")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), MGIEConfig)


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "mgie_7b.yaml"}


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  lora:\n    rank: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['rank'\] at model.lora"):
        load_config(f)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora.r=abc", "model.lora.r: expected int"),
        ("model.lora.enabled=3", "model.lora.enabled: expected bool"),
        ("model.lora.r=true", "model.lora.r: expected int"),
        ("model.mllm.projector=mlp", "model.mllm.projector: 'mlp' is not one of"),
        ("model.diffusion.unet.block_out_channels=[32, x]", r"block_out_channels\[1\]: expected int"),
        ("model.quantization.bits=3", "bits: 3 is not one of"),
        ("model=5", "model: expected a mapping"),
        ("model.loss.drop_text=0.95", "drop probabilities"),
        ("model.diffusion.unet.coord_channels=1", "coord_channels must be 0 or 2"),
        ("model.diffusion.unet.coord_channels=2", r"in_channels must be 2 x vae.latent_channels \+ coord"),
    ],
)
def test_wrong_types_and_values_raise(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_overrides_and_int_to_float():
    cfg = load_config(
        overrides=["model.lora.r=8", "train.lr=1", "model.diffusion.unet.block_out_channels=[8, 16]"]
    )
    assert cfg.model.lora.r == 8 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.diffusion.unet.block_out_channels == [8, 16]
    assert cfg.model.lora.alpha == 32  # untouched siblings keep defaults
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


def test_preset_then_yaml_then_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nmodel:\n  lora:\n    r: 2\n")
    cfg = load_config(f, ["model.lora.alpha=3"])
    assert cfg.model.mllm.text.hidden_size == 64  # from the tiny preset
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (2, 3)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(overrides=["preset=nope"])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(overrides=["preset=tiny", "deepspeed={zero_optimization: {stage: 2}}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(to_dict(cfg)) == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_zero_snr_needs_a_non_epsilon_prediction():
    with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
        load_config(None, ["model.diffusion.noise.rescale_betas_zero_snr=true"])
    cfg = load_config(None, ["model.diffusion.noise.rescale_betas_zero_snr=true",
                             "model.diffusion.noise.prediction_type=sample"])  # fmt: skip
    assert cfg.model.diffusion.noise.rescale_betas_zero_snr is True
