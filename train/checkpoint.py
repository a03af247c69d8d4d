"""DeepSpeed checkpoints (atomic ``latest``, pruning, resume) and export to the inference folder.

Layout of a run directory::

    RUN/config.yaml  RUN/train.log  RUN/tokenizer/
    RUN/checkpoints/step00000010/...   DeepSpeed files of every rank
    RUN/checkpoints/latest             the tag of the last *complete* checkpoint

``engine.save_checkpoint`` runs on all ranks; only after a barrier does rank 0 replace
``latest`` (write to a temp file, then ``os.replace``), so a save killed half-way never
replaces the last good checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

LATEST = "latest"


def tag_for(step: int) -> str:
    """Checkpoint tag of optimizer step ``step``."""
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag in ``latest``, if it exists and its folder does."""
    f = ckpt_dir / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """Save on every rank, then (rank 0) atomically point ``latest`` at it and prune old tags."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: max(0, len(tags) - keep)]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()


def resume(engine, ckpt_dir: Path) -> dict | None:
    """Load the latest complete checkpoint (module, optimizer, LR schedule); its client state or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    return client_state
