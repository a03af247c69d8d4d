"""``python -m mgie.edit``: edit one image from a terse instruction and print the expressive one.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 130 interrupted.
The input file is never written; an existing output is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from mgie.cli import Parser, ranged, run_command

SAVE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = Parser(prog="python -m mgie.edit", description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True, help="input image (any format PIL reads)")
    p.add_argument(
        "--instruction", required=True, help='terse edit instruction, e.g. "make it look like night"'
    )
    p.add_argument("--out", help="output file (default: <input>_mgie.png beside the input)")
    p.add_argument("--checkpoint", help="MGIE checkpoint folder (default: the built-in model)")
    p.add_argument(
        "--seed", type=ranged(int, 0, 2**63 - 1), help="random seed (default: the config's, 13331)"
    )
    p.add_argument("--steps", type=ranged(int, 1, 1000), help="denoising steps (default: the config's)")
    p.add_argument("--guidance", type=ranged(float, 0.0, 100.0), help="text guidance scale (default 7.5)")
    p.add_argument(
        "--image-guidance", type=ranged(float, 0.0, 100.0), help="image guidance scale (default 1.5)"
    )
    p.add_argument(
        "--scheduler", help="sampler: euler_ancestral (default), ddim, dpm++, ... or a diffusers class"
    )
    p.add_argument(
        "--max-side", type=ranged(int, 64, 4096), help="longer side used for diffusion (default 512)"
    )
    p.add_argument(
        "--keep-unchanged",
        type=ranged(float, 0.0, 1.0),
        metavar="TOL",
        help="keep the input's own pixels where the edit moved a latent cell's colour by <= TOL "
        "(0 = off; default: the config's, 0.1 for the built-in model)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: bfloat16 on CUDA, float32 elsewhere)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the checkpoint's config, e.g. model.quantization.bits=4 (4-bit LLM)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def output_path(image: Path, out: str | None, overwrite: bool) -> Path:
    """Where to write; never the input, never an existing file without ``overwrite``."""
    if out is None:
        path = image.with_name(f"{image.stem}_mgie.png")
        n = 1
        while path.exists():  # keep earlier results
            path = image.with_name(f"{image.stem}_mgie-{n}.png")
            n += 1
    else:
        path = Path(out)
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ValueError(f"unsupported output extension {path.suffix!r}; use one of {sorted(SAVE_FORMATS)}")
    if path.exists() and path.resolve() == image.resolve():
        raise ValueError(f"refusing to overwrite the input image {image}")
    if path.exists() and not overwrite:
        raise ValueError(f"output {path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise ValueError(f"output folder does not exist: {path.parent}")
    return path


def save_image(img, alpha, path: Path) -> None:
    """Write atomically (temp file + rename) in the format the extension names."""
    fmt = SAVE_FORMATS[path.suffix.lower()]
    if alpha is not None and fmt in ALPHA_FORMATS:
        img = img.copy()
        img.putalpha(alpha.resize(img.size))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


EMBEDDED = Path(__file__).resolve().parent / "assets" / "mgie-shapes"


def load_default_model(dtype, overrides: list[str] | None = None):
    """The model used when no ``--checkpoint`` is given: the embedded ``mgie-shapes`` when it is
    installed, else the tiny preset with untrained weights (it says so)."""
    import torch

    from mgie.model import MGIEModel

    if (EMBEDDED / "config.yaml").is_file():
        return MGIEModel.from_pretrained(EMBEDDED, dtype=dtype, overrides=overrides)
    if overrides:
        raise ValueError("--set needs --checkpoint (or the embedded model)")
    from mgie.presets import tiny
    from mgie.tokens import build_tiny_tokenizer

    cfg = tiny()
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(cfg.model.mllm.text.vocab_size, cfg.model.mllm.num_img_tokens)
    print(
        "note: no --checkpoint given and no embedded model installed: using the tiny preset, whose weights "
        "are untrained (random), so the edit is noise",
        file=sys.stderr,
    )
    return MGIEModel.from_config(cfg, tokenizer, adapters=False)


def run(args: argparse.Namespace) -> int:
    """Validate everything cheap first, then load the model and edit."""
    from mgie.images import load_image
    from mgie.utils import resolve_device, torch_dtype

    device = resolve_device(args.device)
    image_path = Path(args.image)
    loaded = load_image(image_path)
    out = output_path(image_path, args.out, args.overwrite)
    if not args.instruction.strip():
        raise ValueError("the instruction is empty")
    dtype = torch_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    from mgie.model import MGIEModel
    from mgie.pipeline import MGIEPipeline

    if args.quiet or not args.checkpoint:  # the embedded model loads in a blink: no loading bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if args.checkpoint:
        model = MGIEModel.from_pretrained(args.checkpoint, dtype=dtype, overrides=args.set)
    else:
        model = load_default_model(dtype, args.set)
    quantized = bool(model.cfg.model.quantization.bits)  # k-bit layers keep their storage dtype
    pipe = MGIEPipeline(model.to(device=device) if quantized else model.to(device=device, dtype=dtype))
    pipe.check_instruction(args.instruction)
    t1 = time.perf_counter()
    result = pipe(
        [loaded.rgb],
        [args.instruction],
        steps=args.steps,
        guidance=args.guidance,
        image_guidance=args.image_guidance,
        seed=args.seed,
        scheduler=args.scheduler,
        max_side=args.max_side,
        progress=not args.quiet,
        keep=args.keep_unchanged,
    )
    t2 = time.perf_counter()
    save_image(result.images[0], loaded.alpha, out)
    print(result.expressive[0])
    if not result.expressive[0]:
        print("note: the model wrote no expressive text before its [IMG] tokens", file=sys.stderr)
    print(f"wrote {out} (load {t1 - t0:.1f}s, edit {t2 - t1:.1f}s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mgie.edit`` / ``mgie-edit``."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
