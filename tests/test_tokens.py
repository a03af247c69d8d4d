import json

import pytest
import torch

from mgie.tokens import (
    IGNORE_INDEX,
    SYSTEM,
    add_mgie_tokens,
    build_example,
    build_prompt,
    img_hidden_states,
    mgie_token_names,
    pad_sequences,
)

from .conftest import fixture_path


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(fixture_path("llama_tokenizer"))
    return tok, add_mgie_tokens(tok, 8)


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(fixture_path("llama_tokenizer", "tokenizer.model")))


def test_added_tokens_take_official_ids(llama):
    tok, ids = llama
    assert len(tok) == 32011
    assert tok.convert_tokens_to_ids(mgie_token_names(8)) == list(range(32000, 32011))
    assert (ids.im_patch, ids.im_start, ids.im_end, ids.img) == (
        32000,
        32001,
        32002,
        tuple(range(32003, 32011)),
    )
    assert (ids.bos, ids.eos, ids.pad) == (1, 2, 0)
    assert add_mgie_tokens(tok, 8) == ids and len(tok) == 32011  # idempotent


def test_golden_prompt_ids(llama):
    tok, ids = llama
    p = build_prompt(tok, ids, "turn the day into night", 256)
    # 311 tokens: the length the official slow tokenizer gives for this demo prompt (reference 6).
    assert len(p) == 311
    assert p[:8] == [
        1,
        319,
        13563,
        1546,
        263,
        12758,
        1404,
        322,
    ]  # <s> ▁A ▁chat ▁between ▁a ▁curious ▁user ▁and
    assert p[-5:] == [319, 1799, 9047, 13566, 29901]  # ▁A SS IST ANT : right after <im_end>
    start = p.index(32001)
    assert p[start : start + 258] == [32001] + [32000] * 256 + [32002]
    assert p[start - 5 : start] == [278, 2462, 964, 4646, 29915]  # ▁the ▁day ▁into ▁night ' (no "\n" piece)


@pytest.mark.parametrize("i", range(20))
def test_prompt_ids_match_sentencepiece(llama, sp, i):
    """Every demo instruction: our ids equal a direct SentencePiece computation of the slow tokenizer's."""
    tok, ids = llama
    instruction = json.loads(fixture_path("photos", "instructions.json").read_text())[i]["instruction"]
    user = f"{SYSTEM} USER: what will this image be like if '{instruction}'"
    expected = [1] + sp.encode(user) + [32001] + [32000] * 256 + [32002] + sp.encode("ASSISTANT:")
    assert build_prompt(tok, ids, instruction, 256) == expected


def test_example_labels_supervise_only_the_answer(llama, sp):
    tok, ids = llama
    input_ids, labels = build_example(tok, ids, "make it dark", "The sky turns black.", 256)
    n_prompt = len(build_prompt(tok, ids, "make it dark", 256))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert (
        labels[n_prompt:]
        == input_ids[n_prompt:]
        == sp.encode("The sky turns black.") + list(range(32003, 32011)) + [2]
    )


def test_prompt_without_system_line(llama, sp):
    """``system=""`` (model.mllm.system_prompt) leaves the system line out, against SentencePiece."""
    tok, ids = llama
    got = build_prompt(tok, ids, "make it  dark", 4, system="")
    image = [ids.im_start] + [ids.im_patch] * 4 + [ids.im_end]
    want = (
        [1]
        + sp.encode("USER: what will this image be like if 'make it dark'")
        + image
        + sp.encode("ASSISTANT:")
    )
    assert got == want


def test_partial_tokens_rejected(tokenizer):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(fixture_path("llama_tokenizer"))
    tok.add_tokens(["<im_patch>"], special_tokens=True)
    with pytest.raises(ValueError, match="only some of the MGIE tokens"):
        add_mgie_tokens(tok, 8)


def test_tiny_tokenizer_is_deterministic(tokenizer, tiny_cfg):
    from mgie.tokens import build_tiny_tokenizer

    again = build_tiny_tokenizer(tiny_cfg.model.mllm.text.vocab_size, tiny_cfg.model.mllm.num_img_tokens)
    text = "make it look like night"
    assert again.encode(text) == tokenizer.encode(text) and len(again) == len(tokenizer) == 512 + 7


def test_img_hidden_states_left_padding_batch():
    img = (90, 91, 92)
    rows = [[5, 6, 7, 90, 91, 92, 2], [8, 90, 91, 92, 2]]
    input_ids, mask = pad_sequences(rows, 0, side="left")  # second row is padded on the left by 2
    hidden = torch.arange(2 * 7, dtype=torch.float).view(2, 7, 1).expand(2, 7, 3)  # value = b * 7 + pos
    out = img_hidden_states(hidden, input_ids, img)
    assert out.shape == (2, 3, 3)
    # Row 0: [IMG0] at 3 -> states 2, 3, 4. Row 1: [IMG0] at 3 (after 2 pads) -> 2, 3, 4 of row 1.
    assert out[0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert out[1, :, 0].tolist() == [9.0, 10.0, 11.0]


@pytest.mark.parametrize("row", [[5, 90, 91], [5, 90, 91, 92, 92], [5, 92, 91, 90], [90, 91, 92]])
def test_img_hidden_states_rejects_bad_rows(row):
    ids = torch.tensor([row])
    with pytest.raises(ValueError):
        img_hidden_states(torch.zeros(1, len(row), 2), ids, (90, 91, 92))
