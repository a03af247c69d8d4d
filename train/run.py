"""Train MGIE end to end: ``deepspeed train/run.py --config configs/NAME.yaml [--set a.b=c ...] [--resume]``.

The same program runs as ``python train/run.py ...`` (one process) and under
``torchrun --nproc_per_node N train/run.py ...``; CUDA uses NCCL, CPU gloo, with no code change.
The YAML's ``deepspeed:`` section is the DeepSpeed config (batch sizes derived from ``train.*``).
Sections: setup -> data -> model -> engine -> resume -> loop (log, checkpoint).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import socket
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed train/run.py` from anywhere

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402

from mgie.cli import Parser, error_line  # noqa: E402
from mgie.config import ConfigError, MGIEConfig, load_config, save_config  # noqa: E402
from mgie.precision import autocast  # noqa: E402
from mgie.utils import get_logger, seed_everything  # noqa: E402
from train import checkpoint  # noqa: E402
from train.optim import build_optimizer, build_scheduler, deepspeed_config, param_groups  # noqa: E402


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: the config, dotted overrides and --resume (the launcher's --local_rank is accepted)."""
    p = Parser(prog="train/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-4"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- setup


def check_startup(cfg: MGIEConfig) -> None:
    """Fail fast, before any process group or model exists, on paths that do not exist."""
    if not cfg.data.path or not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path does not exist: {cfg.data.path!r} (data.dataset={cfg.data.dataset})")
    for key in ("init_from", "init_vae"):
        value = getattr(cfg.train, key)
        if value and not Path(value).is_dir():
            raise ConfigError(f"train.{key} is not a folder: {value!r}")
    tok = cfg.model.mllm.tokenizer
    if not cfg.train.init_from and tok and not Path(tok).is_dir():
        raise ConfigError(f"model.mllm.tokenizer is not a folder: {tok!r}")
    if cfg.train.max_steps < 1 or cfg.train.micro_batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.max_steps, train.micro_batch_size and train.grad_accum must be >= 1")


def adopt_vae_scale(cfg: MGIEConfig) -> None:
    """Take ``scaling_factor`` into the config from the VAE the run starts from (``train.init_vae``,
    else ``train.init_from``'s ``vae/``; none: nothing to do), after checking its architecture: the
    scale is part of the latents the UNet learns, and the run's config is what ``train/export.py``
    builds the exported model from."""
    import json

    if cfg.train.init_vae:
        key, path = "init_vae", Path(cfg.train.init_vae) / "config.json"
    elif cfg.train.init_from:
        key, path = "init_from", Path(cfg.train.init_from) / "vae" / "config.json"
        if not path.is_file():
            return  # not a checkpoint: loading it says what it lacks
    else:
        return
    try:
        folder = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.{key}: cannot read {path}: {e}") from None
    from mgie.diffusion import VAE_KEYS, architecture_mismatch

    vae = cfg.model.diffusion.vae
    wrong = architecture_mismatch(vae, folder, VAE_KEYS, "model.diffusion.vae")
    if wrong:
        raise ConfigError(f"train.{key}: the folder's VAE: {wrong}")
    vae.scaling_factor = float(folder.get("scaling_factor", vae.scaling_factor))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join (or, run plainly, create) the process group; NCCL on CUDA, gloo on CPU."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python train/run.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


# ----------------------------------------------------------------------------- data


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded over ranks, that can start mid-epoch.

    Every rank draws the same permutation (seed + epoch) and takes every ``world``-th index, so
    the data order is a function of (seed, epoch, position) alone and resumes exactly.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch, self.start = 0, 0

    def per_rank(self) -> int:
        """Samples this rank draws per epoch."""
        return self.n // self.world

    def set_position(self, epoch: int, start: int) -> None:
        """Resume from ``start`` samples into ``epoch``."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        perm = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        mine = perm[self.rank : self.per_rank() * self.world : self.world]
        return iter(mine[self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start


def build_data(cfg: MGIEConfig, model, rank: int, world: int):
    """Dataset, resumable sampler and loader for ``data.dataset`` at ``data.path``."""
    from mgie.data.dataset import EditDataset, collate
    from mgie.data.formats import load_records

    records = load_records(cfg.data.dataset, cfg.data.path, cfg.data.split)
    captions = load_records("jsonl", cfg.data.captions) if cfg.data.captions else []
    dataset = EditDataset(records, model.tokenizer, model.ids, cfg, captions)
    sampler = ResumableSampler(len(dataset), rank, world, cfg.train.seed)
    per_epoch = sampler.per_rank() // cfg.train.micro_batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"{len(dataset)} examples are too few for micro_batch_size {cfg.train.micro_batch_size} x {world} processes"
        )
    loader = partial(
        DataLoader,
        dataset,
        batch_size=cfg.train.micro_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=partial(collate, pad_id=model.ids.pad),
        persistent_workers=False,
    )
    return dataset, sampler, loader, per_epoch


# ----------------------------------------------------------------------------- model


def build_model(cfg: MGIEConfig):
    """The model to train: from ``train.init_from`` or randomly initialised from the config."""
    from mgie.model import MGIEModel
    from mgie.presets import TINY_VOCAB
    from mgie.tokens import add_mgie_tokens, build_tiny_tokenizer

    if cfg.train.init_from:
        model = load_init_from(cfg)
    else:
        m = cfg.model.mllm
        if m.tokenizer:
            from transformers import LlamaTokenizer

            tokenizer = LlamaTokenizer.from_pretrained(m.tokenizer)
            add_mgie_tokens(tokenizer, m.num_img_tokens)
        elif m.text.vocab_size == TINY_VOCAB:
            tokenizer = build_tiny_tokenizer(TINY_VOCAB, m.num_img_tokens)
        else:
            raise ConfigError(
                "model.mllm.tokenizer must name a LLaMA tokenizer folder for this vocabulary size"
            )
        model = MGIEModel.from_config(cfg, tokenizer)
    if cfg.train.init_vae:  # replaces init_from's VAE too (before a UNet learns its latents)
        _load_vae(model, cfg)
    groups = model.trainable_groups()
    frozen = set(cfg.train.freeze) | (set() if cfg.train.train_unet else {"unet"})
    for name in frozen:
        for p in groups[name]:
            p.requires_grad_(False)
    return model


def load_init_from(cfg: MGIEConfig):
    """``train.init_from``, trainable. A folder made without the extra UNet inputs the config asks
    for gets them: its ``conv_in`` is widened (:func:`mgie.diffusion.widen_conv_in`) for the
    coordinate channels (``model.diffusion.unet.coord_channels``; ``train.coord_init`` 0 = zero
    weights, else that multiple of a default draw) and then, at zero, for the edit map
    (``map_channels``). The edit head gets a fresh :class:`~mgie.edit_head.MapHead` when the
    config asks for one (``edit_head.map_grid``) and the folder's does not fit it (none, or another
    grid or design), or always with ``train.fresh_map_head``; a folder's text-reading head, asked to
    read the image patches too (``edit_head.map_image``), keeps its weights and gains fresh patch
    positions. With zero weights the model starts out computing what the folder did (the map aside).
    ``train.fresh_unet`` builds the UNet from the config instead of loading the folder's."""
    import copy
    import json

    from safetensors import safe_open

    from mgie.diffusion import widen_conv_in
    from mgie.edit_head import new_map_head
    from mgie.mllm import num_patches
    from mgie.model import MGIEModel

    unet, head = cfg.model.diffusion.unet, cfg.model.edit_head
    root = Path(cfg.train.init_from)
    folder = root / "unet" / "config.json"
    fresh_unet = cfg.train.fresh_unet
    if fresh_unet:  # a UNet built whole from the config: nothing to widen
        has = unet.in_channels
    else:
        has = json.loads(folder.read_text()).get("in_channels") if folder.is_file() else None
    plain = unet.in_channels - unet.coord_channels - unet.map_channels  # the IP2P 8
    fresh = (
        new_map_head(head, cfg.model.mllm.text.hidden_size, num_patches(cfg.model.mllm))
        if head.map_grid
        else None
    )
    if fresh is not None and not cfg.train.fresh_map_head and (root / "edit_head.safetensors").is_file():
        with safe_open(root / "edit_head.safetensors", "pt") as f:
            saved = {k[len("map_head.") :]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                     if k.startswith("map_head.")}  # fmt: skip
            want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
            if saved == want:
                fresh = None  # the folder's map head fits: load it
            elif saved == {k: v for k, v in want.items() if k != "patch_pos"}:  # a text-reading head
                fresh.load_state_dict({k: f.get_tensor("map_head." + k) for k in saved}, strict=False)
    if has not in (plain, plain + unet.coord_channels, unet.in_channels) or (
        fresh is None and has == unet.in_channels
    ):  # nothing to add (or a folder that cannot fit, which from_pretrained reports)
        return MGIEModel.from_pretrained(cfg.train.init_from, adapters=True, cfg=cfg, fresh_unet=fresh_unet)
    start = copy.deepcopy(cfg)  # the folder's own layout, for loading
    s_unet, s_head = start.model.diffusion.unet, start.model.edit_head
    if has != unet.in_channels:
        s_unet.in_channels, s_unet.coord_channels, s_unet.map_channels = has, has - plain, 0
    s_head.map_grid = 0
    model = MGIEModel.from_pretrained(
        cfg.train.init_from, adapters=True, cfg=start, skip_map_head=True, fresh_unet=fresh_unet
    )
    if has < plain + unet.coord_channels:
        widen_conv_in(model.unet, plain + unet.coord_channels, cfg.train.coord_init)
    if unet.map_channels and has < unet.in_channels:
        widen_conv_in(model.unet, unet.in_channels, 0.0)
    if fresh is not None:
        w = model.edit_head.llm2hid.weight
        model.edit_head.map_head = fresh.to(w.device, w.dtype)
    model.edit_head.cfg = head
    model.cfg = cfg
    return model


def _load_vae(model, cfg: MGIEConfig) -> None:
    """Replace the model's VAE by ``train.init_vae`` (whose architecture and scaling factor
    :func:`adopt_vae_scale` checked against, and took into, the config)."""
    from diffusers import AutoencoderKL

    from mgie.mllm import freeze
    from mgie.model import load_diffusers

    model.vae = freeze(load_diffusers(AutoencoderKL, Path(cfg.train.init_vae), torch.float32)).eval()


# ----------------------------------------------------------------------------- loop helpers


def memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocator peak, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def all_finite(loss: torch.Tensor) -> bool:
    """True if the loss is finite on every rank (all ranks must skip a step together)."""
    flag = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def tensorboard(run_dir: Path, rank: int):
    """A SummaryWriter on rank 0 when tensorboard is installed, else None."""
    if rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ----------------------------------------------------------------------------- main


def train(cfg: MGIEConfig, resume: bool) -> int:
    """The training run; returns the final optimizer step."""
    import deepspeed

    run_dir, ckpt_dir = Path(cfg.train.output_dir), Path(cfg.train.output_dir) / "checkpoints"
    rank, world, device = setup_distributed()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    log = get_logger("mgie.train", run_dir / "train.log" if rank == 0 else None, rank, sys.stdout)
    ds_config = deepspeed_config(cfg, world)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    log.info(
        "world %d on %s; micro batch %d x accum %d -> global batch %d",
        world,
        device.type,
        cfg.train.micro_batch_size,
        cfg.train.grad_accum,
        ds_config["train_batch_size"],
    )

    # model
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    if rank == 0:
        model.tokenizer.save_pretrained(run_dir / "tokenizer")
    counts = {k: sum(p.numel() for p in v) for k, v in model.trainable_groups().items()}
    log.info("trainable parameters: %s", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))

    # data
    dataset, sampler, make_loader, per_epoch = build_data(cfg, model, rank, world)
    log.info(
        "data: %s at %s, %d examples (%d of them image-text pairs from %s), %d micro-batches per epoch per rank",
        cfg.data.dataset,
        cfg.data.path,
        len(dataset),
        len(dataset) - dataset.num_edits,
        cfg.data.captions or "-",
        per_epoch,
    )

    # engine
    optimizer = build_optimizer(param_groups(model.trainable_groups(), cfg), cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg), config=ds_config
    )

    # resume
    step, micro = 0, 0
    if resume:
        state = checkpoint.resume(engine, ckpt_dir)
        if state is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        else:
            step, micro = state["step"], state["micro"]
            log.info("resumed from step %d (%d micro-batches consumed)", step, micro)

    writer = tensorboard(run_dir, rank)
    bad, window, t_start = 0, [], time.perf_counter()
    t_log, steps_at_log = t_start, step
    while step < cfg.train.max_steps:
        sampler.set_position(micro // per_epoch, (micro % per_epoch) * cfg.train.micro_batch_size)
        for batch in make_loader():
            batch = {k: v.to(device) for k, v in batch.items()}
            gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + micro * 97 + rank)
            with autocast(device, cfg.train.autocast):
                out = engine(**batch, generator=gen)
            micro += 1
            if not all_finite(out.loss):
                bad += 1
                log.warning(
                    "step %d: non-finite loss (lm %s, edit %s): skipped (%d in a row)",
                    step,
                    out.lm_loss.item(),
                    out.edit_loss.item(),
                    bad,
                )
                if bad >= cfg.train.max_bad_steps:
                    raise TrainingStopped(f"{bad} non-finite losses in a row (train.max_bad_steps); stopping")
                continue
            bad = 0
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(out.loss)
            engine.step()
            window.append(
                (
                    out.loss.item(),
                    out.lm_loss.item(),
                    out.edit_loss.item(),
                    0.0 if out.map_loss is None else out.map_loss.item(),
                    0.0 if out.patch_loss is None else out.patch_loss.item(),
                )
            )
            if not boundary:
                continue
            step += 1
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                now = time.perf_counter()
                rate = (step - steps_at_log) * ds_config["train_batch_size"] / (now - t_log)
                eta = (cfg.train.max_steps - step) * (now - t_log) / (step - steps_at_log)
                loss, lm, edit, emap, patch = (sum(x) / len(window) for x in zip(*window))
                lr = scheduler.get_last_lr()[0]
                log.info(
                    "step %d/%d loss %.4f lm %.4f edit %.4f%s%s lr %.2e | %.2f samples/s | mem %.0f MiB | eta %s",
                    step,
                    cfg.train.max_steps,
                    loss,
                    lm,
                    edit,
                    f" map {emap:.4f}" if cfg.model.edit_head.map_grid else "",
                    f" patch {patch:.4f}" if cfg.model.loss.patch_weight else "",
                    lr,
                    rate,
                    memory_mb(device),
                    _hms(eta),
                )
                if writer:
                    for k, v in (
                        ("loss", loss),
                        ("lm_loss", lm),
                        ("edit_loss", edit),
                        ("map_loss", emap),
                        ("patch_loss", patch),
                        ("lr", lr),
                        ("samples_per_s", rate),
                    ):
                        writer.add_scalar(f"train/{k}", v, step)
                window, t_log, steps_at_log = [], now, step
            if step % cfg.train.save_every == 0 or step == cfg.train.max_steps:
                checkpoint.save(
                    engine, ckpt_dir, step, {"step": step, "micro": micro}, cfg.train.keep_checkpoints
                )
                log.info("saved checkpoint %s", checkpoint.tag_for(step))
            if step >= cfg.train.max_steps:
                break
    log.info("done: %d steps in %s", step, _hms(time.perf_counter() - t_start))
    if writer:
        writer.close()
    return step


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds)) if math.isfinite(seconds) else 0
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; configuration and data errors exit 2 with one line, before any training."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if not cfg.train.output_dir:
            cfg.train.output_dir = str(Path("runs") / Path(args.config).stem)
        check_startup(cfg)
        adopt_vae_scale(cfg)
    except ValueError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    try:
        train(cfg, args.resume)
    except (ValueError, TrainingStopped) as e:
        print(error_line(e), file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
