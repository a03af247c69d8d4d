"""The training programme, run as users run it (subprocesses), on tiny configs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.optim import cosine_with_warmup, deepspeed_config
from train.run import ResumableSampler, main

from .conftest import make_model, random_image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Four random source/target pairs in our JSONL manifest format."""
    root = tmp_path_factory.mktemp("data")
    lines = []
    for i in range(4):
        random_image(48, 40, seed=10 + i).save(root / f"{i}_src.png")
        random_image(48, 40, seed=20 + i).save(root / f"{i}_tgt.png")
        lines.append(
            {
                "id": str(i),
                "source": f"{i}_src.png",
                "target": f"{i}_tgt.png",
                "instruction": ["make it dark", "add a circle"][i % 2],
                **({"expressive": "the picture becomes dark"} if i % 2 == 0 else {}),
            }
        )
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root / "manifest.jsonl"


def overrides(run: Path, manifest: Path, *extra: str) -> list[str]:
    base = [
        f"train.output_dir={run}",
        "data.dataset=jsonl",
        f"data.path={manifest}",
        "data.resolution=32",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.lr=1e-2",
        "train.warmup_ratio=0.1",
        "deepspeed.zero_optimization.stage=0",
        *extra,
    ]
    return [x for o in base for x in ("--set", o)]


def train_cmd(launcher: list[str], run: Path, manifest: Path, *extra: str) -> list[str]:
    return [
        *launcher,
        str(ROOT / "train" / "run.py"),
        "--config",
        str(TINY),
        *overrides(run, manifest, *extra),
    ]


def run_ok(cmd: list[str], timeout: int = 400) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([0-9.]+)", log)]


def final_params(run: Path, tag: str) -> dict[str, torch.Tensor]:
    from train.export import training_state

    return training_state(run / "checkpoints", tag)


# ----------------------------------------------------------------------------- units


def test_sampler_shards_resumes_and_reshuffles():
    a, b = ResumableSampler(10, 0, 2, seed=3), ResumableSampler(10, 1, 2, seed=3)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 5 and not set(ia) & set(ib) and sorted(ia + ib) == list(range(10))
    a.set_position(0, 2)
    assert list(a) == ia[2:]
    a.set_position(1, 0)
    assert list(a) != ia  # a new epoch draws a new permutation
    again = ResumableSampler(10, 0, 2, seed=3)
    again.set_position(1, 0)
    assert list(again) == list(a)  # a function of (seed, epoch, position) alone


def test_lr_schedule_and_deepspeed_batch_sizes(tiny_cfg):
    assert cosine_with_warmup(0, 100, 0.03) == pytest.approx(1 / 3)
    assert cosine_with_warmup(2, 100, 0.03) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 100, 0.03) == pytest.approx(0.0)
    assert cosine_with_warmup(51, 100, 0.03) == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(torch.pi * 48 / 97)).item())
    )
    from mgie.config import ConfigError, load_config

    cfg = load_config(TINY, ["train.micro_batch_size=3", "train.grad_accum=2"])
    ds = deepspeed_config(cfg, world_size=4)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (3, 2, 24)
    with pytest.raises(ConfigError, match="derived"):
        deepspeed_config(load_config(TINY, ["deepspeed.train_batch_size=8"]), 1)
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(load_config(TINY, ["deepspeed.optimizer={type: Adam}"]), 1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_warm=1", "unknown config key"),
        ("train.max_steps=ten", "train.max_steps: expected int"),
        ("data.path=/no/such/folder", "data.path does not exist"),
        ("data.dataset=coco", "data.dataset: 'coco' is not one of"),
    ],
)
def test_bad_config_fails_at_startup_with_one_line(capsys, override, message):
    code = main(["--config", str(TINY), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_init_vae_scaling_factor_is_adopted_and_architecture_checked(tmp_path, capsys):
    from dataclasses import replace

    from mgie.config import load_config
    from mgie.diffusion import build_vae
    from train.run import adopt_vae_scale

    cfg = load_config(TINY)
    build_vae(replace(cfg.model.diffusion.vae, scaling_factor=0.37)).save_pretrained(tmp_path / "vae")
    cfg.train.init_vae = str(tmp_path / "vae")
    adopt_vae_scale(cfg)
    assert cfg.model.diffusion.vae.scaling_factor == pytest.approx(0.37)  # the latents the UNet learns
    wide = replace(cfg.model.diffusion.vae, latent_channels=8)
    build_vae(wide).save_pretrained(tmp_path / "wide")
    code = main(["--config", str(TINY), "--set", f"train.init_vae={tmp_path / 'wide'}"])
    err = capsys.readouterr().err
    assert code == 2 and "latent_channels=8 differs" in err and err.count("\n") == 1


def test_init_from_scaling_factor_is_adopted(tmp_path, tokenizer):
    """A run continued from a checkpoint (how a continued mgie-shapes run once exported with the
    preset's scale 1.0 instead of its VAE's 0.47) takes the folder's VAE scale into its config."""
    from mgie.config import load_config
    from mgie.model import MGIEModel
    from train.run import adopt_vae_scale

    cfg = load_config(TINY)
    cfg.model.diffusion.vae.scaling_factor = 0.37
    make_model(cfg, tokenizer, adapters=False).save_pretrained(tmp_path / "ckpt")
    cfg = load_config(TINY)
    adopt_vae_scale(cfg)  # no folder to start from: the config's own scale stays
    assert (
        cfg.model.diffusion.vae.scaling_factor == load_config(TINY).model.diffusion.vae.scaling_factor != 0.37
    )
    cfg.train.init_from = str(tmp_path / "ckpt")
    adopt_vae_scale(cfg)
    assert cfg.model.diffusion.vae.scaling_factor == pytest.approx(0.37)
    assert MGIEModel.from_pretrained(tmp_path / "ckpt", cfg=cfg).vae.config.scaling_factor == pytest.approx(
        0.37
    )


# ----------------------------------------------------------------------------- end to end


def test_single_process_trains_checkpoints_and_exports(tmp_path, manifest, capsys):
    run = tmp_path / "run"
    log = run_ok(train_cmd([sys.executable], run, manifest, "train.max_steps=12", "train.save_every=6"))
    ls = losses(log)
    assert len(ls) == 12 and ls[-1] < 0.85 * ls[0], ls  # one fixed batch: the loss goes down
    assert "samples/s" in log and "eta" in log and (run / "train.log").read_text().count("loss") >= 12
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step00000012"

    from mgie.edit import main as edit_main
    from train.export import main as export_main

    assert export_main(["--run", str(run), "--out", str(tmp_path / "export")]) == 0
    img = tmp_path / "in.png"
    random_image(40, 32).save(img)
    code = edit_main(
        [
            "--image",
            str(img),
            "--instruction",
            "make it dark",
            "--checkpoint",
            str(tmp_path / "export"),
            "--steps",
            "2",
            "--quiet",
            "--out",
            str(tmp_path / "out.png"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    # The exported weights are the trained ones: the UNet equals the checkpoint's.
    from mgie.model import MGIEModel

    exported = MGIEModel.from_pretrained(tmp_path / "export")
    state = final_params(run, "step00000012")
    unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    for k, v in exported.unet.state_dict().items():
        assert torch.equal(v, unet[k]), k

    # float16 export with a fine-tuned decoder swapped in: weights are the trained ones rounded
    # to float16, except the decoder; a VAE with another encoder is refused.
    vae = exported.vae
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)
    vae.save_pretrained(tmp_path / "dec")
    args = [
        "--run",
        str(run),
        "--out",
        str(tmp_path / "half"),
        "--dtype",
        "float16",
        "--set",
        "inference.steps=7",
        "--vae",
        str(tmp_path / "dec"),
    ]
    assert export_main(args) == 0, capsys.readouterr().err
    half = MGIEModel.from_pretrained(tmp_path / "half")
    assert half.cfg.inference.steps == 7
    for k, v in half.unet.state_dict().items():
        assert torch.equal(v, unet[k].half().float()), k
    torch.testing.assert_close(half.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias.half().float())
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(1.0)
    vae.save_pretrained(tmp_path / "enc")
    capsys.readouterr()
    args[3], args[-1] = str(tmp_path / "bad"), str(tmp_path / "enc")
    assert export_main(args) == 2 and "encoder differs" in capsys.readouterr().err


def test_captions_are_mixed_in_for_the_ce_only(tmp_path, manifest):
    """data.captions: its rows join the training set, flagged as having no edit to learn."""
    from mgie.config import load_config
    from mgie.data.dataset import collate
    from train.run import build_data, build_model

    cfg = load_config(TINY, overrides(tmp_path / "run", manifest, f"data.captions={manifest}")[1::2])
    model = build_model(cfg)
    dataset, *_ = build_data(cfg, model, 0, 1)
    assert len(dataset) == 8 and dataset.num_edits == 4
    batch = collate([dataset[i] for i in (0, 5, 3, 7)], model.ids.pad)
    assert batch["has_edit"].tolist() == [True, False, True, False]
    cmd = train_cmd(
        [sys.executable], tmp_path / "run", manifest, f"data.captions={manifest}", "train.max_steps=3"
    )
    log = run_ok(cmd)
    assert "8 examples (4 of them image-text pairs" in log and len(losses(log)) == 3


def test_resume_matches_an_uninterrupted_run(tmp_path, manifest):
    full = tmp_path / "full"
    run_ok(train_cmd([sys.executable], full, manifest, "train.max_steps=6", "train.save_every=3"))
    # A second run that resumes from the step-3 checkpoint of the first.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step00000003", part / "checkpoints" / "step00000003")
    (part / "checkpoints" / "latest").write_text("step00000003")
    log = run_ok(
        train_cmd([sys.executable], part, manifest, "train.max_steps=6", "train.save_every=3") + ["--resume"]
    )
    assert "resumed from step 3" in log
    a, b = final_params(full, "step00000006"), final_params(part, "step00000006")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_kill_then_resume(tmp_path, manifest):
    run = tmp_path / "run"
    cmd = train_cmd([sys.executable], run, manifest, "train.max_steps=400", "train.save_every=2")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=ROOT, start_new_session=True
    )
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_file() and latest.read_text() >= "step00000004"):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = int(latest.read_text()[4:])
    assert saved >= 4
    log = run_ok(train_cmd([sys.executable], run, manifest, f"train.max_steps={saved + 2}") + ["--resume"])
    assert f"resumed from step {saved}" in log and f"step {saved + 2}/{saved + 2}" in log


def test_non_finite_losses_stop_training(tmp_path, manifest):
    cmd = train_cmd(
        [sys.executable], tmp_path / "run", manifest, "model.loss.edit_weight=.nan", "train.max_bad_steps=2"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 2
    assert "non-finite loss" in proc.stdout and "error: 2 non-finite losses in a row" in proc.stderr


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_two_deepspeed_processes_zero2(tmp_path):
    """The README command: `deepspeed --num_gpus 2 train/run.py --config configs/tiny.yaml` (gloo on CPU)."""
    from .conftest import fixture_path

    fixture_path("ip2p_sample")
    run = tmp_path / "tiny"
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(ROOT / "train" / "run.py"),
        "--config",
        str(TINY),
        "--set",
        f"train.output_dir={run}",
        "--set",
        "train.max_steps=8",
        "--set",
        "train.log_every=1",
        "--set",
        "train.save_every=4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=ENV, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    log = (run / "train.log").read_text()
    assert "world 2 on cpu" in log and "global batch 4" in log
    ls = losses(log)
    assert len(ls) == 8 and ls[-1] < ls[0], ls
    tag = run / "checkpoints" / "step00000008"
    assert len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-2: one optimizer shard per rank


@pytest.mark.parametrize(
    "mode, launcher, extra",
    [
        ("zero3", [sys.executable], ["deepspeed.zero_optimization.stage=3"]),
        (
            "qlora-adamw8bit",
            [sys.executable],
            [
                "model.quantization.bits=4",
                "model.quantization.compute_dtype=float32",
                "train.optimizer=adamw8bit",
                "deepspeed.zero_optimization.stage=2",
            ],
        ),
        ("bf16-autocast", [sys.executable], ["train.autocast=bfloat16"]),
        (
            "frozen-unet-torchrun",
            ["torchrun", "--nproc_per_node", "2"],
            ["train.train_unet=false", "train.micro_batch_size=2"],
        ),
    ],
)
def test_memory_modes_and_launchers(tmp_path, manifest, tiny_cfg, tokenizer, mode, launcher, extra):
    """Each mode trains, checkpoints and exports; the frozen UNet stays bit-identical."""
    from mgie.model import MGIEModel

    from .conftest import make_model

    init = tmp_path / "init"
    make_model(tiny_cfg, tokenizer, seed=5, adapters=False).save_pretrained(init)
    if launcher[0] == "torchrun":
        launcher = [*launcher, "--master_port", str(30500 + os.getpid() % 1000)]
    run = tmp_path / "run"
    log = run_ok(
        train_cmd(
            launcher,
            run,
            manifest,
            "train.max_steps=3",
            "train.save_every=3",
            f"train.init_from={init}",
            *extra,
        )
    )
    assert len(losses(log)) == 3 and "step 3/3" in log
    from train.export import main as export_main

    assert export_main(["--run", str(run), "--out", str(tmp_path / "export")]) == 0
    exported, start = MGIEModel.from_pretrained(tmp_path / "export"), MGIEModel.from_pretrained(init)
    same = [
        torch.equal(a, b)
        for a, b in zip(exported.unet.state_dict().values(), start.unet.state_dict().values())
    ]
    assert all(same) == (mode == "frozen-unet-torchrun")
    if mode == "qlora-adamw8bit":  # the exported LLM is the full-precision base plus the trained LoRA
        base = dict(start.mllm.named_parameters())
        changed = [n for n, p in exported.mllm.named_parameters() if not torch.equal(p, base[n])]
        assert changed and all(
            "language_model" in n or "embed_tokens" in n or "lm_head" in n for n in changed
        )
    if mode == "frozen-unet-torchrun":
        assert "world 2" in log
