"""MGIE special tokens, the prompt/target template, and [IMG] hidden-state extraction.

Everything here is shared by training and inference, so that the two can never drift apart
(the official code re-typed this logic three times and hard-coded id 32003 and ``[-8:]``).

Token ids follow the official vocabulary: ``<im_patch>``, ``<im_start>``, ``<im_end>``, then
``[IMG0]..[IMG{N-1}]`` appended after the base vocabulary (32000..32010 for LLaMA). They are
always looked up *by name* in the tokenizer and located in sequences with ``input_ids == id``.

Prompt ids reproduce the tokenizer the model was trained with (LLaMA's slow SentencePiece
tokenizer of transformers 4.28): text between added tokens is encoded chunk by chunk, each chunk
stripped of surrounding whitespace and given SentencePiece's dummy prefix. Building the ids from
pieces makes them independent of fast/slow tokenizer drift (reference section 5.5).
"""

from __future__ import annotations

import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def img_token_names(n: int) -> list[str]:
    """``["[IMG0]", ..., "[IMG{n-1}]"]``."""
    return [f"[IMG{i}]" for i in range(n)]


def mgie_token_names(n: int) -> list[str]:
    """All tokens MGIE adds to the LLaMA vocabulary, in the official order."""
    return [IM_PATCH, IM_START, IM_END, *img_token_names(n)]


@dataclass(frozen=True)
class TokenIds:
    """Ids of every special token the model uses, read from the tokenizer by name."""

    bos: int
    eos: int
    pad: int
    im_patch: int
    im_start: int
    im_end: int
    img: tuple[int, ...]


def add_mgie_tokens(tokenizer, num_img_tokens: int) -> TokenIds:
    """Add the MGIE tokens once (a no-op if present) and return their ids.

    Raises ``ValueError`` if the tokens exist but not as one contiguous block after the base
    vocabulary in the official order: the model's embedding rows would not line up.
    """
    names = mgie_token_names(num_img_tokens)
    vocab = tokenizer.get_vocab()
    missing = [t for t in names if t not in vocab]
    if missing and len(missing) != len(names):
        raise ValueError(f"tokenizer has only some of the MGIE tokens; missing {missing}")
    base = len(tokenizer)
    if missing:
        tokenizer.add_tokens(names, special_tokens=True)
    else:
        base = vocab[names[0]]
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(base, base + len(names))):
        raise ValueError(f"MGIE tokens must take contiguous ids from {base} in the order {names}; got {ids}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA v1 pads with <unk>
    return token_ids(tokenizer, num_img_tokens)


def token_ids(tokenizer, num_img_tokens: int) -> TokenIds:
    """Look every special token up by name; raise ``ValueError`` if one is missing."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in mgie_token_names(num_img_tokens) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the MGIE tokens {missing}")
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[0]
    if not first.startswith("\u2581"):  # LLaMA's SentencePiece prepends "\u2581" to every chunk
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} does not add SentencePiece's dummy prefix; "
            "load LLaMA tokenizers with transformers.LlamaTokenizer"
        )
    img = tuple(vocab[t] for t in img_token_names(num_img_tokens))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    return TokenIds(
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=pad,
        im_patch=vocab[IM_PATCH],
        im_start=vocab[IM_START],
        im_end=vocab[IM_END],
        img=img,
    )


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def encode_chunk(tokenizer, text: str, collapse: bool = True) -> list[int]:
    """Encode one text chunk as the slow LLaMA tokenizer did: stripped, with the dummy prefix.

    ``collapse`` also turns inner whitespace runs into single spaces (our normalisation of user
    text); without it they stay, as in the official expressive-data prompt's double space.
    """
    text = normalize_text(text) if collapse else text.strip()
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def build_prompt(
    tokenizer, ids: TokenIds, instruction: str, num_patches: int, system: str = SYSTEM
) -> list[int]:
    """Token ids of the MGIE user turn, up to and including ``ASSISTANT:``.

    String form (Vicuna v1.1): ``<s>{system} USER: what will this image be like if '{ins}'
    <im_start><im_patch>*P<im_end> ASSISTANT:``; with ``num_patches=0`` (a text-only LLM, the
    LGIE baseline) the image part is left out; ``system=""`` drops the system line (for models
    trained from scratch: ``model.mllm.system_prompt``).
    """
    user = f"{system} USER: what will this image be like if '{normalize_text(instruction)}'"
    image = [ids.im_start] + [ids.im_patch] * num_patches + [ids.im_end] if num_patches else []
    return [ids.bos] + encode_chunk(tokenizer, user) + image + encode_chunk(tokenizer, "ASSISTANT:")


def build_target(tokenizer, ids: TokenIds, expressive: str) -> list[int]:
    """Token ids of the assistant turn: expressive text, ``[IMG0..N-1]``, ``</s>``."""
    return encode_chunk(tokenizer, expressive) + list(ids.img) + [ids.eos]


def build_example(
    tokenizer, ids: TokenIds, instruction: str, expressive: str, num_patches: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for training: only the assistant turn is supervised."""
    prompt = build_prompt(tokenizer, ids, instruction, num_patches)
    target = build_target(tokenizer, ids, expressive)
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def pad_sequences(
    seqs: list[list[int]], pad_value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a ``(B, L)`` LongTensor; returns ``(padded, attention_mask)``."""
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        out[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


def img_hidden_states(
    hidden: torch.Tensor, input_ids: torch.Tensor, img_ids: tuple[int, ...]
) -> torch.Tensor:
    """Hidden states at the positions that *predict* ``[IMG0..N-1]``.

    ``hidden`` (B, L, H) are last-layer (post-norm) states of a teacher-forced pass over
    ``input_ids`` (B, L). For each k the state at ``pos([IMGk]) - 1`` is taken, i.e. the token
    before [IMG0] and [IMG0]..[IMG{N-2}] (official: ``labels.index(32003) - 1``, 8 states).
    Every row must contain each [IMG] token exactly once, in order; otherwise ``ValueError``.
    Returns (B, N, H).
    """
    ids = torch.tensor(img_ids, device=input_ids.device)  # (N,)
    match = input_ids.unsqueeze(-1) == ids  # (B, L, N)
    counts = match.sum(dim=1)  # (B, N)
    if not bool((counts == 1).all()):
        bad = sorted({int(b) for b in (counts != 1).nonzero()[:, 0]})
        raise ValueError(f"rows {bad} do not contain each [IMG] token exactly once")
    pos = match.int().argmax(dim=1)  # (B, N) position of [IMGk]
    if not bool((pos[:, 1:] == pos[:, :-1] + 1).all()) or not bool((pos[:, 0] >= 1).all()):
        raise ValueError("[IMG] tokens must be consecutive and follow at least one token")
    index = (pos - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, N, H)
    return hidden.gather(1, index)


def text_states(
    states: torch.Tensor, input_ids: torch.Tensor, answer: torch.Tensor, img0: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The expressive text's rows of ``states``, left-aligned: ``(text (B, T, H), mask (B, T))``.

    ``states`` (B, L, H); ``answer`` (B, L) True over the assistant turn (the labels' span in
    training). The text is the answer's tokens before ``[IMG0]`` (id ``img0``), in order; ``T`` is
    the longest text of the batch and ``mask`` is True at real tokens.
    """
    before = (input_ids == img0).int().cumsum(1) == 0  # (B, L) positions before [IMG0]
    keep = answer & before  # (B, L)
    t = int(keep.sum(1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).int(), dim=1, stable=True)[:, :t]  # (B, T) kept positions first
    text = states.gather(1, order.unsqueeze(-1).expand(-1, -1, states.shape[-1]))  # (B, T, H)
    return text, keep.gather(1, order)


# ----------------------------------------------------------------------------- tiny tokenizer

_TINY_CORPUS = f"""{SYSTEM}
USER: ASSISTANT: what will this image be like if
make it look like night. turn the day into night. make the sky blue. make it brighter.
make it darker. increase the contrast. make it grayscale. invert the colors. add a warm tint.
remove the red square. add a green circle next to the blue triangle. move the yellow star to the left.
make the small square bigger. change the colour of the large red square to blue.
make the odd one out blue. remove the biggest shape. paint it like the sea. give him a beard.
make the frame red. remove the text. change the background to a brick wall. 0123456789
the image will show a dark night scene with a black sky, stars and a bright moon above the houses.
"""


def train_sentencepiece(lines: list[str], vocab_size: int) -> bytes:
    """A deterministic SentencePiece BPE model (the bytes of a ``tokenizer.model``) in LLaMA's
    layout: unk 0, bos 1, eos 2, byte fallback, dummy prefix, no normalisation."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    return buf.getvalue()


def train_tokenizer(lines: list[str], vocab_size: int, num_img_tokens: int):
    """:func:`train_sentencepiece` on ``lines``, loaded through ``LlamaTokenizer`` (the same class
    and code path as the real LLaMA tokenizer), with the MGIE tokens added."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(train_sentencepiece(lines, vocab_size))
        tokenizer = LlamaTokenizer.from_pretrained(tmp)  # converts the .model like a real checkpoint
    add_mgie_tokens(tokenizer, num_img_tokens)
    return tokenizer


TINY_CORPUS_LINES = _TINY_CORPUS.splitlines() * 4


def build_tiny_tokenizer(vocab_size: int, num_img_tokens: int):
    """The tiny preset's tokenizer: :func:`train_tokenizer` on a small built-in corpus."""
    return train_tokenizer(TINY_CORPUS_LINES, vocab_size, num_img_tokens)
