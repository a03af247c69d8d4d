"""Train the VAE of a model built from scratch: ``python train/vae.py --config CFG --out DIR``.

The MGIE training loop keeps the VAE frozen (as the paper does with SD's), so a from-scratch
model such as ``mgie-shapes`` first needs an autoencoder of its world: an ``AutoencoderKL`` of
``model.diffusion.vae`` trained on the data set's source and target images with an L1 + L2
reconstruction loss and a small KL term. Its ``scaling_factor`` is set to 1 / std of the latents,
as SD's 0.18215 was, so the diffusion sees unit-variance latents. Writes a diffusers folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from mgie.cli import Parser, ranged, run_command  # noqa: E402
from mgie.config import load_config  # noqa: E402
from mgie.images import to_tensor  # noqa: E402
from mgie.precision import autocast  # noqa: E402
from mgie.utils import get_logger, seed_everything  # noqa: E402


class Images(Dataset):
    """Every source and target image of the records, as (3, H, W) tensors in [-1, 1]."""

    def __init__(self, records, side: int):
        self.items = [ref for r in records for ref in (r.source, r.target)]
        self.side = side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        from mgie.data.dataset import center_square

        return to_tensor([center_square(self.items[i].load(), self.side)])[0]


def colour_augment(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Recolour a fraction ``p`` of a batch (B, 3, H, W) in [-1, 1]: channels permuted, sometimes
    inverted, then a random gain and offset per channel (clamped to [-1, 1]).

    The world's palette is small; an editor's outputs are not (tints, negatives, new contrasts),
    and an autoencoder reproduces only the colours it was trained on (a flat green field, which
    no source has, came back gray), so it trains on colours from everywhere in the cube.
    """
    b = x.shape[0]
    pick = torch.rand(b, generator=generator) < p  # (B,)
    perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(b)])  # (B, 3)
    y = torch.stack([img[order] for img, order in zip(x, perm)])  # (B, 3, H, W)
    flip = torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.3, -1.0, 1.0)
    gain = 0.5 + 0.7 * torch.rand(b, 3, 1, 1, generator=generator)
    offset = torch.rand(b, 3, 1, 1, generator=generator) - 0.5
    y = (flip * y * gain + offset).clamp(-1, 1)
    return torch.where(pick[:, None, None, None], y, x)


def train_vae(
    cfg,
    out: Path,
    steps: int,
    batch: int,
    lr: float,
    kl_weight: float,
    log,
    init: Path | None = None,
    decoder_only: bool = False,
    augment: float = 0.5,
) -> float:
    """Train, set the scaling factor, save; returns the final reconstruction L1 (in [0, 1] units).

    ``init``: a trained VAE folder to continue from. With ``decoder_only`` only its decoder
    trains: the encoder, hence every latent a UNet was trained on, and the scaling factor stay as
    they are (SD's ft-MSE decoders did this). ``augment``: the fraction of images recoloured by
    :func:`colour_augment`.
    """
    from diffusers import AutoencoderKL

    from mgie.data.formats import load_records
    from mgie.diffusion import build_vae
    from mgie.model import load_diffusers

    seed_everything(cfg.train.seed)
    data = Images(load_records(cfg.data.dataset, cfg.data.path, cfg.data.split), cfg.data.resolution)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=cfg.data.num_workers,
                        generator=torch.Generator().manual_seed(cfg.train.seed))  # fmt: skip
    if init is None:
        vae = build_vae(cfg.model.diffusion.vae).train()
    else:
        vae = load_diffusers(AutoencoderKL, init, torch.float32).train()
    if decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    step, t0, rec_l1 = 0, time.perf_counter(), float("nan")
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    while step < steps:
        for x in loader:
            x = colour_augment(x, augment, gen)
            with autocast(x.device, cfg.train.autocast):  # train.autocast: bf16 matmuls/convolutions
                with torch.set_grad_enabled(not decoder_only):
                    post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample()).sample.float()  # (B, 3, H, W)
            l1 = (rec - x).abs().mean()
            loss = l1 + ((rec - x) ** 2).mean()
            if not decoder_only:
                loss = loss + kl_weight * post.kl().float().mean() / x[0].numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            rec_l1 = float(l1.detach()) / 2  # [-1, 1] -> [0, 1] units
            if step % 50 == 0 or step == steps:
                rate = step * batch / (time.perf_counter() - t0)
                log.info("vae step %d/%d L1 %.4f (0-1 units) | %.1f images/s", step, steps, rec_l1, rate)
            if step >= steps:
                break
    vae.eval()
    if not decoder_only:
        with torch.no_grad():
            lat = torch.cat([vae.encode(x).latent_dist.mode() for x, _ in zip(loader, range(8))])
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    vae.save_pretrained(out)
    log.info("saved %s (scaling factor %.4f)", out, vae.config.scaling_factor)
    return rec_l1


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors are one line and exit 2."""
    p = Parser(prog="train/vae.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="diffusers AutoencoderKL folder to write")
    p.add_argument("--steps", type=ranged(int, 1, 10**7), default=2000)
    p.add_argument("--batch-size", type=ranged(int, 1, 4096), default=32)
    p.add_argument("--lr", type=ranged(float, 1e-7, 1.0), default=2e-3)
    p.add_argument("--kl-weight", type=ranged(float, 0.0, 1.0), default=1e-3)
    p.add_argument("--augment", type=ranged(float, 0.0, 1.0), default=0.5,
                   help="fraction of images recoloured at random (default 0.5)")  # fmt: skip
    p.add_argument("--init", help="a trained VAE folder to continue training from")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init: train the decoder only (latents and scaling factor unchanged)")  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.init and out.resolve() == Path(args.init).resolve():
        p.error("--out must differ from --init (the trained VAE is never overwritten)")
    if args.decoder_only and not args.init:
        p.error("--decoder-only needs --init (the VAE whose encoder to keep)")
    log = get_logger("mgie.vae", None, 0, sys.stdout)
    init = Path(args.init) if args.init else None
    return run_command(lambda: train_vae(load_config(args.config, args.set), out, args.steps, args.batch_size,
                                         args.lr, args.kl_weight, log, init, args.decoder_only, args.augment) and 0)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
