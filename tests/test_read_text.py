"""``edit_head.read_text``: the edit head also reads the expressive text's tokens."""

import copy

import torch

from mgie.model import MGIEModel
from mgie.pipeline import MGIEPipeline
from mgie.tokens import build_example, build_prompt, encode_chunk, pad_sequences, text_states

from .conftest import make_batch, make_model, random_image
from .test_pipeline import _generated_ids


def _cfg(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.edit_head.read_text = True
    return cfg


def test_text_states_by_hand():
    """The answer's tokens before [IMG0], in order, left-aligned and masked, for any padding."""
    img0 = 9
    ids = torch.tensor([[0, 1, 5, 6, 7, 9, 10, 2], [0, 0, 0, 1, 5, 9, 10, 2]])  # row 2 left-padded
    answer = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]).bool()
    states = ids.float()[..., None].expand(-1, -1, 3)  # (2, 8, 3): each row holds its token id
    text, mask = text_states(states, ids, answer, img0)
    assert text.shape == (2, 3, 3)
    assert text[0, :, 0].tolist() == [5, 6, 7] and mask[0].tolist() == [True, True, True]
    assert text[1, 0, 0].item() == 5 and mask[1].tolist() == [True, False, False]


def test_condition_reads_a_word_the_img_states_alone_may_not(tiny_cfg, tokenizer):
    """One colour word changed moves the read_text condition; the null condition has no text."""
    model = make_model(_cfg(tiny_cfg), tokenizer, seed=1).eval()
    m = model.cfg.model.mllm
    patches = (m.vision.image_size // m.vision.patch_size) ** 2
    pixels = torch.randn(
        1, 3, m.vision.image_size, m.vision.image_size, generator=torch.Generator().manual_seed(0)
    )
    conds = []
    for colour in ("red", "blue"):
        seq, lab = build_example(tokenizer, model.ids, "recolour it", f"make the square {colour}", patches)
        ids, lab = torch.tensor([seq]), torch.tensor([lab])
        with torch.no_grad():
            _, h = model.mllm_forward(ids, torch.ones_like(ids), pixels)
            conds.append(model.condition(h, ids, lab != -100))
    diff = (conds[0] - conds[1]).abs().mean() / conds[0].abs().mean()
    assert diff > 1e-3
    with torch.no_grad():  # the head's own null: [IMG] embeddings on zero states, no text
        ref = model.edit_head(torch.zeros(1, *model.img_embeddings().shape), model.img_embeddings())
        torch.testing.assert_close(model.null_condition(), ref)


def test_text_tokens_are_states_plus_embeddings_at_the_states_norm(tiny_cfg, tokenizer):
    """The head's text rows: each text token's state plus its input embedding rescaled to the
    state's norm, recomputed here token by token in float64."""
    model = make_model(_cfg(tiny_cfg), tokenizer, seed=5).eval()
    b = make_batch(model, n=1)
    ids, lab = b["input_ids"], b["labels"]
    seen = {}
    hook = model.edit_head.register_forward_hook(lambda mod, args, out: seen.update(text=args[2]))
    with torch.no_grad():
        _, h = model.mllm_forward(ids, b["attention_mask"], b["pixel_values"])
        model.condition(h, ids, lab != -100)
        emb = model.mllm.get_input_embeddings()(ids)
    hook.remove()
    img0 = (ids[0] == model.ids.img[0]).nonzero()[0, 0]
    rows = [i for i in range(int(img0)) if lab[0, i] != -100]  # the answer before [IMG0]
    assert rows and seen["text"].shape[1] == len(rows)
    for j, i in enumerate(rows):
        s, e = h[0, i].double(), emb[0, i].double()
        want = s + e * s.norm() / e.norm()
        torch.testing.assert_close(seen["text"][0, j].double(), want, rtol=1e-5, atol=1e-5)


def test_padding_and_batching_do_not_change_the_condition(tiny_cfg, tokenizer):
    """Rows padded left or right, batched, give each row's condition alone."""
    model = make_model(_cfg(tiny_cfg), tokenizer, seed=2).eval()
    b = make_batch(model, n=3)
    rows = [r[msk.bool()].tolist() for r, msk in zip(b["input_ids"], b["attention_mask"])]
    labs = [lab[msk.bool()].tolist() for lab, msk in zip(b["labels"], b["attention_mask"])]
    with torch.no_grad():
        alone = []
        for i, (r, lab) in enumerate(zip(rows, labs)):
            ids = torch.tensor([r])
            _, h = model.mllm_forward(ids, torch.ones_like(ids), b["pixel_values"][i : i + 1])
            alone.append(model.condition(h, ids, torch.tensor([lab]) != -100))
        for side in ("left", "right"):
            ids, mask = pad_sequences(rows, model.ids.pad, side=side)
            lab, _ = pad_sequences(labs, -100, side=side)
            _, h = model.mllm_forward(ids, mask, b["pixel_values"])
            got = model.condition(h, ids, lab != -100)
            torch.testing.assert_close(got, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_editing_loss_trains_the_text_embeddings(tiny_cfg, tokenizer):
    """The editing loss alone reaches the input embeddings of the expressive text's words."""
    cfg = _cfg(tiny_cfg)
    cfg.model.loss.lm_weight, cfg.model.loss.drop_text, cfg.model.loss.drop_both = 0.0, 0.0, 0.0
    model = make_model(cfg, tokenizer, seed=3, adapters=False)
    for p in model.parameters():
        p.requires_grad_(True)
    b = make_batch(model, n=2)
    model(**b, generator=torch.Generator().manual_seed(0)).loss.backward()
    grad = model.mllm.get_input_embeddings().weight.grad  # (V, D)
    word = encode_chunk(tokenizer, "night")[0]
    assert grad[word].abs().sum() > 0


def test_pipeline_condition_matches_training_path(tiny_cfg, tokenizer, tmp_path):
    """A saved read_text model: the pipeline's condition equals the training computation."""
    model = make_model(_cfg(tiny_cfg), tokenizer, seed=4, adapters=False)
    model.save_pretrained(tmp_path / "m")
    pipe = MGIEPipeline(MGIEModel.from_pretrained(tmp_path / "m"))
    img = random_image(24, 24, seed=8)
    _, cond = pipe.describe([img], ["make the sky blue"])
    m = pipe.model
    text = _generated_ids(pipe, img)
    assert text  # a text for the head to read
    prompt = build_prompt(tokenizer, m.ids, "make the sky blue", 16)
    ids = torch.tensor([prompt + text + list(m.ids.img)])
    answer = torch.arange(ids.shape[1]) >= len(prompt)
    pixels = pipe.clip(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        _, h = m.mllm_forward(ids, torch.ones_like(ids), pixels)
        torch.testing.assert_close(cond, m.condition(h, ids, answer[None]), rtol=1e-5, atol=1e-6)
