"""``python -m mgie.expressive``: write the expressive-instruction targets of a data set.

This is the paper's data step (reference 2.5, ``process_data.ipynb``), per example:

1. a multimodal LLM (base LLaVA-7B-v1 in the paper; any llava-hf folder here) looks at the
   **source** image with ``what will this image be like if '<edit>'  (in a short paragraph)``
   in the Vicuna v1.1 chat format and writes greedily (the paper: ``max_new_tokens=1024``);
2. the answer is trimmed like ``remove_alter()``: cut at ``</s>``, "alternative" and ``[IMG0]``,
   keep the first 2 sentences (only generated tokens are decoded, so the official cut at
   ``ASSISTANT:``, which dropped the echoed prompt, is not needed: see :func:`remove_alter`);
   an empty answer or summary falls back to :func:`default_expressive` (counted, reported);
3. a seq2seq summariser (``jordiclive/flan-t5-11b-summarizer-filtered`` in the paper) shortens it
   with ``summarize the following paragraph in 32 words:\\n\\n<text>``, 5 beams, lengths 5..64,
   ``no_repeat_ngram_size=3``.

The output is a JSONL manifest (``mgie.data.formats.read_jsonl`` reads it): the input records
that have been processed, in input order, each with an ``expressive`` field. Image paths are
written relative to the manifest's folder; images stored inside parquet files are written once
as PNGs into ``images/`` beside the manifest. The manifest is replaced atomically every
``--save-every`` examples, so an interrupted run loses little, and re-running the same command
resumes: records whose id (with the same instruction) already has an expressive text in the
output are not recomputed.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 130 interrupted (progress
saved). Heavy libraries are imported inside functions: training imports
:func:`default_expressive` from here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mgie.cli import Parser, ranged, run_command
from mgie.tokens import SYSTEM, encode_chunk, normalize_text

PROMPT = "what will this image be like if '{}'  (in a short paragraph)"  # sic: two spaces
SUMMARY_PROMPT = "summarize the following paragraph in 32 words:\n\n{}"
IMAGE_PLACEHOLDER = "<image>"  # stands for the image token span in the string form of the prompt
DATASETS = ("ipr2pr", "magicbrush", "gier", "evr", "ma5k", "jsonl", "shapes")


def default_expressive(instruction: str) -> str:
    """The expressive text used for an example that has none: its normalised terse instruction.

    Training still learns what matters most from such an example (the [IMG] tokens and the edit
    itself); the text CE then teaches the model to restate the instruction rather than to
    describe the edited image, which is harmless but less informative than the paper's targets.
    """
    return normalize_text(instruction)


# ----------------------------------------------------------------------------- text


def mllm_prompt(instruction: str) -> str:
    """The MLLM prompt as a string (Vicuna v1.1, as LLaVA's ``conv.get_prompt()`` builds it).

    ``<image>`` stands for the image tokens (``<im_start>`` + patches + ``<im_end>`` for
    LLaVA-v1); the ``\\n`` before it and the space after it vanish in chunked encoding.
    """
    return f"{SYSTEM} USER: {PROMPT.format(normalize_text(instruction))}\n{IMAGE_PLACEHOLDER} ASSISTANT:"


def mllm_prompt_ids(tokenizer, instruction: str, image_ids: list[int]) -> list[int]:
    """Token ids of :func:`mllm_prompt`, with ``image_ids`` in place of ``<image>``."""
    before, after = mllm_prompt(instruction).split(IMAGE_PLACEHOLDER)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (
        bos
        + encode_chunk(tokenizer, before, collapse=False)
        + list(image_ids)
        + encode_chunk(tokenizer, after, collapse=False)
    )


def trim_answer(text: str, sentences: int = 2) -> str:
    """The generated answer cut at ``</s>``, "alternative" (any case) and ``[IMG0]``, first 2 sentences.

    Sentences end at ``.``, as in the official code (so "3.5" counts as one boundary there too).
    One divergence: the official joined the kept pieces with ``"."`` after stripping them
    ("dark.Stars"); here the original spacing is kept ("dark. Stars"). Whitespace runs are
    collapsed, a final ``.`` is added if missing, and text without a letter or digit gives ``""``.
    """
    for stop in ("</s>", "[IMG0]"):
        text = text.split(stop, 1)[0]
    cut = text.lower().find("alternative")
    if cut >= 0:
        text = text[:cut]
    parts = text.split(".")
    if len(parts) > sentences:
        text = ".".join(parts[:sentences]) + "."
    text = normalize_text(text)
    if not any(c.isalnum() for c in text):
        return ""
    return text if text.endswith(".") else text + "."


def remove_alter(text: str, sentences: int = 2) -> str:
    """The official ``remove_alter`` on a decoded prompt + answer: the text after the first
    ``ASSISTANT:``, then :func:`trim_answer`."""
    if "ASSISTANT:" in text:
        text = text[text.index("ASSISTANT:") + len("ASSISTANT:") :]
    return trim_answer(text, sentences)


# ----------------------------------------------------------------------------- models


@dataclass
class MLLM:
    """A llava-hf ``LlavaForConditionalGeneration`` with its tokenizer and image processor."""

    model: object
    tokenizer: object
    image_processor: object
    image_ids: list[int]  # the token span that stands for one image in the prompt
    pad: int
    stop: list[int]  # generation ends at any of these (``</s>``, and ``[IMG0]`` for MGIE vocabularies)


@dataclass
class Summarizer:
    """A seq2seq summariser (``AutoModelForSeq2SeqLM``) and its tokenizer."""

    model: object
    tokenizer: object


def _model_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a model folder; ``ValueError`` unless it is a folder with a ``config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{flag} {path}: no such folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{flag} {path}: not a transformers model folder (no config.json)")
    return path


def _load(what: str, path: Path, fn):
    """Call a transformers loader; any failure becomes a one-line ``ValueError``."""
    try:
        return fn()
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, RuntimeError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load the {what} from {path}: {first}") from None


def _image_processor(path: Path, vision_config):
    """The folder's own image processor if it has one, else CLIP preprocessing at the tower's size."""
    if (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file():
        from transformers import AutoProcessor

        proc = _load("processor", path, lambda: AutoProcessor.from_pretrained(str(path)))
        proc = getattr(proc, "image_processor", proc)
        if callable(proc) and not hasattr(proc, "encode"):  # an image processor, not a tokenizer
            return proc
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    side = vision_config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def load_mllm(path: str | Path, device, dtype, max_new_tokens: int) -> MLLM:
    """Load a llava-hf folder for greedy generation.

    The image span is ``config.image_token_id`` repeated ``config.image_seq_length`` times,
    wrapped in ``<im_start>``/``<im_end>`` when the tokenizer has them (LLaVA-v1 and MGIE
    vocabularies; llava-hf 1.5 folders have neither). The folder's ``generation_config.json``
    is replaced by the paper's settings, so stray sampling options cannot leak in.
    """
    from transformers import AutoTokenizer, GenerationConfig, LlavaForConditionalGeneration

    path = _model_dir(path, "--mllm")
    tokenizer = _load("MLLM tokenizer", path, lambda: AutoTokenizer.from_pretrained(str(path)))
    model = _load("MLLM", path, lambda: LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype))
    model = model.to(device).eval().requires_grad_(False)
    cfg = model.config
    n = (
        getattr(cfg, "image_seq_length", None)
        or (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    )
    image_ids = [cfg.image_token_id] * n
    vocab = tokenizer.get_vocab()
    if "<im_start>" in vocab and "<im_end>" in vocab:
        image_ids = [vocab["<im_start>"], *image_ids, vocab["<im_end>"]]
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0) if i is not None)
    stop = [tokenizer.eos_token_id] + ([vocab["[IMG0]"]] if "[IMG0]" in vocab else [])
    model.generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop,
        pad_token_id=pad,
    )
    return MLLM(model, tokenizer, _image_processor(path, cfg.vision_config), image_ids, pad, stop)


def load_summarizer(path: str | Path, device, dtype, opts: argparse.Namespace) -> Summarizer:
    """Load a seq2seq folder; generation uses exactly the given beam-search settings."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    path = _model_dir(path, "--summarizer")
    tokenizer = _load("summariser tokenizer", path, lambda: AutoTokenizer.from_pretrained(str(path)))
    tokenizer.padding_side = "right"
    model = _load("summariser", path, lambda: AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=dtype))
    model = model.to(device).eval().requires_grad_(False)
    gen = model.generation_config
    model.generation_config = GenerationConfig(
        num_beams=opts.num_beams,
        min_length=opts.min_length,
        max_length=opts.max_length,
        no_repeat_ngram_size=opts.no_repeat_ngram_size,
        do_sample=False,
        decoder_start_token_id=gen.decoder_start_token_id,
        bos_token_id=gen.bos_token_id,
        eos_token_id=gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id,
    )
    return Summarizer(model, tokenizer)


def generate_paragraphs(mllm: MLLM, images: list, instructions: list[str]) -> list[str]:
    """The MLLM's raw answers (decoded up to the first stop token) for RGB images + edits."""
    import torch

    from mgie.tokens import pad_sequences

    model = mllm.model
    prompts = [mllm_prompt_ids(mllm.tokenizer, t, mllm.image_ids) for t in instructions]
    input_ids, mask = pad_sequences(prompts, mllm.pad, side="left")  # (B, L): decoder-only pads left
    pixels = mllm.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=mask.to(model.device),
            pixel_values=pixels.to(model.device, model.dtype),
        )
    answers = []
    for row in out[:, input_ids.shape[1] :].tolist():  # generated tokens only
        cut = next((i for i, tok in enumerate(row) if tok in mllm.stop), len(row))
        answers.append(mllm.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


def summarize(summ: Summarizer, texts: list[str]) -> list[str]:
    """Summaries of ``texts`` (inputs cut at the tokenizer's maximum length, as the paper's pipeline did)."""
    import torch

    tok, model = summ.tokenizer, summ.model
    limit = tok.model_max_length if tok.model_max_length < 1_000_000 else None
    enc = tok(
        [SUMMARY_PROMPT.format(t) for t in texts],
        return_tensors="pt",
        padding=True,
        truncation=limit is not None,
        max_length=limit,
    )
    with torch.inference_mode():
        out = model.generate(**{k: v.to(model.device) for k, v in enc.items()})
    return [normalize_text(s) for s in tok.batch_decode(out, skip_special_tokens=True)]


def expressive_texts(
    mllm: MLLM, summ: Summarizer, images: list, instructions: list[str], sentences: int = 2
) -> tuple[list[str], int]:
    """Expressive instructions for a batch and how many fell back to :func:`default_expressive`
    (the MLLM or the summariser wrote nothing usable)."""
    paragraphs = [trim_answer(a, sentences) for a in generate_paragraphs(mllm, images, instructions)]
    todo = [i for i, p in enumerate(paragraphs) if p]
    summaries = dict(zip(todo, summarize(summ, [paragraphs[i] for i in todo]))) if todo else {}
    texts = [summaries.get(i) or default_expressive(ins) for i, ins in enumerate(instructions)]
    return texts, sum(1 for i in range(len(texts)) if not summaries.get(i))


# ----------------------------------------------------------------------------- manifest


def _safe_name(record_id: str) -> str:
    """A file-name stem for a record id: readable, and unique thanks to a short hash."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._")[:80] or "record"
    return f"{stem}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"


def _save_png(img, path: Path) -> None:
    """Write a PNG atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _image_ref(image, out_dir: Path, stem: str) -> str:
    """The manifest's path for an image: relative to ``out_dir``; parquet cells become PNGs."""
    from mgie.data.records import FileImage

    if isinstance(image, FileImage):
        return Path(os.path.relpath(image.path.resolve(), out_dir.resolve())).as_posix()
    dest = out_dir / "images" / f"{stem}.png"
    if not dest.exists():
        dest.parent.mkdir(exist_ok=True)
        _save_png(image.load(), dest)
    return f"images/{dest.name}"


def record_dict(record, out_dir: Path, expressive: str) -> dict:
    """One manifest line for ``record`` with its expressive text."""
    stem = _safe_name(record.id)
    return {
        "id": record.id,
        "source": _image_ref(record.source, out_dir, f"{stem}_source"),
        "target": _image_ref(record.target, out_dir, f"{stem}_target"),
        "instruction": record.instruction,
        "expressive": expressive,
    }


def read_done(out: Path) -> dict[str, dict]:
    """The lines of an existing output that have a non-empty expressive text, by record id."""
    if not out.exists():
        return {}
    if not out.is_file():
        raise ValueError(f"--out {out} exists and is not a file")
    done = {}
    with out.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rid, text = str(row["id"]), row.get("expressive")
            except (ValueError, TypeError, KeyError):
                raise ValueError(
                    f"--out {out} line {n} is not a manifest line; is it the right file?"
                ) from None
            if isinstance(text, str) and text.strip():
                done[rid] = row
    return done


def _check_out(out: Path, args: argparse.Namespace, records) -> None:
    """Refuse an output that is an input (the data set, a model folder or an image)."""
    target = out.resolve()
    data = Path(args.data_path).resolve()
    inputs = {data, data / "manifest.jsonl", Path(args.mllm).resolve(), Path(args.summarizer).resolve()}
    for r in records:
        for img in (r.source, r.target):
            inputs.add(Path(img.path).resolve())
    if target in inputs:
        raise ValueError(f"--out {out} is one of the inputs; choose another file")
    if not out.parent.is_dir():
        raise ValueError(f"output folder does not exist: {out.parent}")


# ----------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = Parser(prog="python -m mgie.expressive", description=__doc__.splitlines()[0])
    p.add_argument("--data-dataset", required=True, choices=DATASETS, help="input data set format")
    p.add_argument("--data-path", required=True, help="input data set (folder or manifest)")
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument("--mllm", required=True, help="llava-hf style folder (the paper: LLaVA-7B-v1)")
    p.add_argument("--summarizer", required=True, help="seq2seq folder (the paper: flan-t5-11b summariser)")
    p.add_argument("--out", required=True, help="output JSONL manifest; an existing one is resumed")
    p.add_argument(
        "--max-new-tokens", type=ranged(int, 1), default=256, help="MLLM answer length (paper: 1024)"
    )
    p.add_argument("--sentences", type=ranged(int, 1), default=2, help="sentences kept from the answer (2)")
    p.add_argument("--num-beams", type=ranged(int, 1), default=5, help="summariser beams (5)")
    p.add_argument("--min-length", type=ranged(int, 0), default=5, help="summariser min length in tokens (5)")
    p.add_argument(
        "--max-length", type=ranged(int, 1), default=64, help="summariser max length in tokens (64)"
    )
    p.add_argument(
        "--no-repeat-ngram-size", type=ranged(int, 0), default=3, help="summariser n-gram block (3)"
    )
    p.add_argument("--batch-size", type=ranged(int, 1), default=8, help="examples per batch (8)")
    p.add_argument(
        "--save-every", type=ranged(int, 1), default=100, help="rewrite the output every N examples"
    )
    p.add_argument("--limit", type=ranged(int, 1), help="only the first N records of the data set")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: bfloat16 on CUDA, float32 elsewhere)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _records(args: argparse.Namespace) -> list:
    """The input records (first ``--limit``); ``ValueError`` on a missing path or duplicate ids."""
    from mgie.data.formats import load_records

    if not Path(args.data_path).exists():
        raise ValueError(f"--data-path {args.data_path}: no such file or folder")
    records = load_records(args.data_dataset, args.data_path, split=args.split)
    if args.limit is not None:
        records = records[: args.limit]
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"duplicate record id {r.id!r} in {args.data_path}: ids key the resume cache")
        seen.add(r.id)
    return records


def run(args: argparse.Namespace) -> int:
    """Validate the cheap things, load both models, then fill in the missing expressive texts."""
    from mgie.data.formats import write_jsonl
    from mgie.utils import resolve_device, torch_dtype

    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    _model_dir(args.mllm, "--mllm")
    _model_dir(args.summarizer, "--summarizer")
    out = Path(args.out)
    if out.is_dir():  # a folder holds its manifest as manifest.jsonl (the formats convention)
        out = out / "manifest.jsonl"
    records = _records(args)
    _check_out(out, args, records)
    cached = read_done(out)
    ids = {r.id for r in records}
    extra = [row for rid, row in cached.items() if rid not in ids]
    if extra and args.limit is None:
        raise ValueError(
            f"--out {out} holds {len(extra)} records that are not in the input (e.g. {extra[0]['id']!r}); "
            "a different data set or split? choose another --out"
        )
    # extra: records past --limit that an earlier, longer run finished; they stay in the output
    out_dir = out.parent
    done = {  # a record whose instruction changed since is recomputed
        r.id: record_dict(r, out_dir, cached[r.id]["expressive"])
        for r in records
        if r.id in cached and cached[r.id].get("instruction") == r.instruction
    }
    pending = [r for r in records if r.id not in done]

    def save() -> None:
        write_jsonl([done[r.id] for r in records if r.id in done] + extra, out)

    status = f"{len(records)} records: {len(done)} already in {out}, {len(pending)} to compute"
    if not pending:
        save()
        print(status, file=sys.stderr)
        return 0

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    mllm = load_mllm(args.mllm, device, dtype, args.max_new_tokens)
    summ = load_summarizer(args.summarizer, device, dtype, args)
    print(f"{status} (models loaded in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    fallbacks, unsaved, computed = 0, 0, 0
    bar = tqdm(total=len(pending), unit="ex", desc="expressive", disable=args.quiet, dynamic_ncols=True)
    try:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start : start + args.batch_size]
            images = [_load_source(r) for r in batch]
            texts, fell = expressive_texts(mllm, summ, images, [r.instruction for r in batch], args.sentences)
            for r, text in zip(batch, texts):
                done[r.id] = record_dict(r, out_dir, text)
            fallbacks, unsaved, computed = fallbacks + fell, unsaved + len(batch), computed + len(batch)
            bar.update(len(batch))
            bar.set_postfix(fallback=fallbacks, refresh=False)
            if unsaved >= args.save_every:
                save()
                unsaved = 0
    finally:  # an interrupt or a bad image keeps what was computed
        bar.close()
        if unsaved:
            save()
    elapsed = time.perf_counter() - t0
    if fallbacks:
        print(
            f"note: {fallbacks} of {computed} examples got no usable text from the models and use "
            "their terse instruction instead",
            file=sys.stderr,
        )
    print(f"wrote {out}: {len(done)} records ({computed} computed in {elapsed:.1f}s)", file=sys.stderr)
    return 0


def _load_source(record):
    """The record's source image; ``ValueError`` naming the record if it cannot be read."""
    try:
        return record.source.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"record {record.id!r}: cannot read its source image: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mgie.expressive``."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), "interrupted (progress saved; run the same command to resume)")


if __name__ == "__main__":
    sys.exit(main())
