"""Export a training checkpoint to the inference folder ``python -m mgie.edit --checkpoint`` reads.

``python train/export.py --run RUN_DIR --out DIR [--tag TAG] [--keep-adapter]``

Works offline for every ZeRO stage: ZeRO-sharded weights (stage 1-3) are gathered into one fp32
state dict with DeepSpeed's ``zero_to_fp32``; stage-0 checkpoints hold the module as is.
The model is rebuilt from the run's resolved config and tokenizer and loaded strictly.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mgie.cli import Parser, run_command  # noqa: E402
from mgie.config import load_config  # noqa: E402
from mgie.utils import torch_dtype  # noqa: E402
from train.checkpoint import latest_tag  # noqa: E402


def training_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 module state dict of checkpoint ``tag`` (gathering ZeRO shards)."""
    folder = ckpt_dir / tag
    if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    states = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise ValueError(f"{folder} holds no DeepSpeed model states")
    # Our own DeepSpeed checkpoint: it stores config and client state next to the tensors.
    return torch.load(states[0], map_location="cpu", weights_only=False)["module"]


def export(
    run_dir: Path,
    out: Path,
    tag: str | None = None,
    keep_adapter: bool = False,
    dtype: str = "float32",
    vae: Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Rebuild the model of ``run_dir``, load checkpoint ``tag`` (default: latest), save to ``out``
    with its weights in ``dtype`` (``float16`` halves the folder; loading casts back).

    ``vae``: a VAE folder whose decoder replaces the trained one (``train/vae.py --init``); its
    encoder must be the one the UNet was trained with, so the latents keep their meaning.
    ``overrides``: ``key=value`` settings of the saved config (e.g. tuned ``inference.*`` defaults).
    """
    from transformers import AutoTokenizer

    from mgie.model import MGIEModel

    ckpt_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise ValueError(f"no checkpoint {tag or '(latest)'} in {ckpt_dir}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} exists and is not empty")
    cfg = load_config(run_dir / "config.yaml", overrides)
    state = training_state(ckpt_dir, tag)
    if cfg.model.quantization.bits:
        model = _kbit_run_model(cfg, state)
    else:
        model = MGIEModel.from_config(cfg, AutoTokenizer.from_pretrained(run_dir / "tokenizer"))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint {tag} does not fit the run's config: {str(e).splitlines()[0]}"
            ) from None
    if vae is not None:
        swap_decoder(model, vae)
    model.to(torch_dtype(dtype)).save_pretrained(out, merge_adapters=not keep_adapter)
    return out


def swap_decoder(model, path: Path) -> None:
    """Load the VAE weights at ``path`` into ``model.vae``; ``ValueError`` unless its encoder is
    exactly the model's, i.e. only the decoder was fine-tuned. The model's scaling factor stays."""
    from diffusers import AutoencoderKL

    from mgie.model import load_diffusers

    new = load_diffusers(AutoencoderKL, path, torch.float32)
    old = model.vae.state_dict()
    encoder = ("encoder.", "quant_conv.")
    if not all(torch.equal(v, old[k].float()) for k, v in new.state_dict().items() if k.startswith(encoder)):
        raise ValueError(f"{path}: its encoder differs from the one the UNet was trained with")
    model.vae.load_state_dict(new.state_dict())


def _kbit_run_model(cfg, state: dict):
    """A QLoRA run: full-precision base weights from ``train.init_from``, trained parts from ``state``."""
    import dataclasses

    from mgie.model import MGIEModel

    if not cfg.train.init_from:
        raise ValueError("a k-bit run has no full-precision base to export onto (train.init_from is empty)")
    full = dataclasses.replace(cfg.model, quantization=dataclasses.replace(cfg.model.quantization, bits=0))
    model = MGIEModel.from_pretrained(
        cfg.train.init_from, adapters=True, cfg=dataclasses.replace(cfg, model=full)
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trained - state.keys())
    if missing:
        raise ValueError(f"checkpoint lacks trained weights {missing[:5]}")
    model.load_state_dict({k: state[k] for k in trained}, strict=False)
    return model


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors are one line and exit 2."""
    p = Parser(prog="train/export.py", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (train.output_dir)")
    p.add_argument("--out", required=True, help="inference folder to write")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00000020 (default: latest)")
    p.add_argument(
        "--keep-adapter", action="store_true", help="keep LoRA as a peft adapter instead of merging"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="dtype of the saved weights",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config setting"
    )
    p.add_argument("--vae", help="VAE folder with a fine-tuned decoder (train/vae.py --init) to ship instead")
    args = p.parse_args(argv)

    def run() -> int:
        vae = Path(args.vae) if args.vae else None
        out = export(Path(args.run), Path(args.out), args.tag, args.keep_adapter, args.dtype, vae, args.set)
        print(f"exported {args.run} -> {out}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
