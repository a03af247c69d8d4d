"""``python -m mgie.expressive`` on tiny random models: prompt, clean-up, end to end, resume, errors."""

import io
import json
from pathlib import Path

import pytest
import torch

from mgie import expressive
from mgie.data.records import EditRecord, FileImage, ParquetImage
from mgie.expressive import (
    default_expressive,
    load_mllm,
    main,
    mllm_prompt,
    mllm_prompt_ids,
    record_dict,
    remove_alter,
    trim_answer,
)
from mgie.tokens import SYSTEM, build_tiny_tokenizer

from .conftest import fixture_path, random_image

INSTRUCTIONS = [
    "make it look like night",
    "remove the red square",
    "make the sky blue and add a green circle",
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny llava-hf folder, a tiny T5 summariser folder and a 3-example JSONL data set."""
    from transformers import T5Config, T5ForConditionalGeneration

    from mgie.mllm import build_mllm
    from mgie.presets import tiny

    root = tmp_path_factory.mktemp("expressive")
    tok = build_tiny_tokenizer(512, 4)  # has <im_patch> (the image token), <im_start>, <im_end>, [IMG0..3]
    torch.manual_seed(0)
    mllm = root / "mllm"
    build_mllm(tiny().model.mllm).save_pretrained(mllm)  # 16 image tokens, vocabulary of `tok`
    tok.save_pretrained(mllm)

    # T5 reusing the LLaMA-layout SentencePiece vocabulary: pad 0 (<unk>), eos 2, decoder start 0
    t5 = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    torch.manual_seed(1)
    summ = root / "summ"
    T5ForConditionalGeneration(t5).save_pretrained(summ)
    tok.save_pretrained(summ)

    data = root / "data"
    (data / "img").mkdir(parents=True)
    lines = []
    for i, ins in enumerate(INSTRUCTIONS):
        random_image(24 + 8 * i, 20, seed=i).save(data / "img" / f"{i}_0.png")
        random_image(24 + 8 * i, 20, seed=10 + i).save(data / "img" / f"{i}_1.png")
        lines.append(
            {"id": f"ex{i}", "source": f"img/{i}_0.png", "target": f"img/{i}_1.png", "instruction": ins}
        )
    (data / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"mllm": mllm, "summ": summ, "manifest": data / "train.jsonl", "tokenizer": tok}


def argv(folders, out, *extra):
    return [
        "--data-dataset",
        "jsonl",
        "--data-path",
        str(folders["manifest"]),
        "--mllm",
        str(folders["mllm"]),
        "--summarizer",
        str(folders["summ"]),
        "--out",
        str(out),
        "--max-new-tokens",
        "12",
        "--max-length",
        "12",
        "--num-beams",
        "2",
        "--quiet",
        *extra,
    ]


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    return lines[0]


def counting(monkeypatch, replacement=None):
    """Wrap ``generate_paragraphs`` and record the instructions it is called with."""
    seen: list[str] = []
    real = expressive.generate_paragraphs

    def wrapped(mllm, images, instructions):
        seen.extend(instructions)
        return replacement(instructions) if replacement else real(mllm, images, instructions)

    monkeypatch.setattr(expressive, "generate_paragraphs", wrapped)
    return seen


# ----------------------------------------------------------------------------- text


def test_prompt_string_is_the_official_one():
    assert mllm_prompt("  make it\nlook like  night ") == (
        f"{SYSTEM} USER: what will this image be like if 'make it look like night'  (in a short paragraph)"
        "\n<image> ASSISTANT:"
    )


def test_prompt_ids_under_the_real_llama_tokenizer():
    """llava-hf layout: an added ``<image>`` token repeated; the double space survives as ``▁▁``."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(fixture_path("llama_tokenizer")))
    tok.add_tokens(["<image>"], special_tokens=True)
    img = tok.convert_tokens_to_ids("<image>")
    assert img == 32000
    ids = mllm_prompt_ids(tok, "make it look like night", [img] * 5)
    start = ids.index(img)
    assert ids[0] == 1 and ids[start : start + 5] == [img] * 5 and ids.count(img) == 5
    assert ids[start + 5 :] == [319, 1799, 9047, 13566, 29901]  # ▁A SS IST ANT :
    text = ids[1:start]
    assert (
        text[-7:] == [29915, 259, 29898, 262, 263, 3273, 14880, 29897][-7:]
    )  # '  ▁▁ ( in ▁a ▁short ▁paragraph )
    assert 259 in text  # "▁▁": the two spaces before "(in a short paragraph)"
    assert tok.decode(text) == mllm_prompt("make it look like night").split("\n")[0]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("ASSISTANT: The sky is dark. Stars shine. The moon is up.</s>", "The sky is dark. Stars shine."),
        ("USER: hi ASSISTANT: A night scene.</s> ignored. text.", "A night scene."),
        ("ASSISTANT: It becomes night. Alternatively, dusk. More.", "It becomes night."),
        ("ASSISTANT: It is night. An alternative is dusk.", "It is night. An."),  # official quirk kept
        ("ASSISTANT: Night, or ALTERNATIVELY dusk", "Night, or."),
        ("ASSISTANT: The tree is 3.5 m tall. Later.", "The tree is 3.5 m tall."),
        ("ASSISTANT: dark sky\n\nwith  stars", "dark sky with stars."),
        ("ASSISTANT: A red car [IMG0][IMG1]", "A red car."),
        ("ASSISTANT: </s>", ""),
        ("ASSISTANT: ...", ""),
        ("", ""),
    ],
)
def test_remove_alter(raw, expected):
    assert remove_alter(raw) == expected


def test_trim_answer_is_remove_alter_after_the_prompt():
    answer = " The image shows a dark night. Stars appear. The moon rises."
    assert (
        trim_answer(answer)
        == remove_alter(mllm_prompt("x") + answer)
        == "The image shows a dark night. Stars appear."
    )
    assert trim_answer(answer, sentences=1) == "The image shows a dark night."


def test_default_expressive_is_the_normalised_instruction():
    assert default_expressive("  make it\n look like night ") == "make it look like night"


# ----------------------------------------------------------------------------- models


def test_mllm_image_span_and_batched_generation_match_single(folders):
    """Left padding: a batch gives the same answers as one example at a time."""
    mllm = load_mllm(folders["mllm"], torch.device("cpu"), torch.float32, max_new_tokens=8)
    tok = folders["tokenizer"]
    patch, start, end = tok.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"])
    assert mllm.image_ids == [start] + [patch] * 16 + [end]
    assert tok.convert_tokens_to_ids("[IMG0]") in mllm.stop and tok.eos_token_id in mllm.stop
    images = [random_image(30, 20, seed=s) for s in range(2)]
    ins = [INSTRUCTIONS[0], INSTRUCTIONS[2]]  # different lengths -> padding
    batched = expressive.generate_paragraphs(mllm, images, ins)
    single = [expressive.generate_paragraphs(mllm, [im], [t])[0] for im, t in zip(images, ins)]
    assert batched == single


def test_image_processor_comes_from_the_folder_when_it_has_one(folders, tmp_path):
    from transformers import CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = CLIPVisionConfig(image_size=16, patch_size=4)
    fallback = expressive._image_processor(tmp_path, vision)
    assert fallback.crop_size["height"] == 16
    CLIPImageProcessorPil(size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12}).save_pretrained(
        tmp_path
    )
    own = expressive._image_processor(tmp_path, vision)
    assert own.crop_size["height"] == 12


# ----------------------------------------------------------------------------- command


def test_end_to_end_fills_every_record(folders, tmp_path, capsys):
    from mgie.data.formats import read_jsonl

    out = tmp_path / "out" / "expressive.jsonl"
    out.parent.mkdir()
    assert main(argv(folders, out, "--batch-size", "2")) == 0
    records = read_jsonl(out)
    assert [r.id for r in records] == ["ex0", "ex1", "ex2"]
    assert [r.instruction for r in records] == INSTRUCTIONS
    for r in records:
        assert isinstance(r.expressive, str) and r.expressive.strip()
        assert r.source.path.resolve() == (folders["manifest"].parent / "img" / f"{r.id[2:]}_0.png").resolve()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(not Path(r["source"]).is_absolute() for r in rows)
    assert "3 computed" in capsys.readouterr().err


def test_resume_skips_finished_records(folders, tmp_path, monkeypatch):
    from mgie.data.formats import read_jsonl

    out = tmp_path / "expressive.jsonl"
    seen = counting(monkeypatch)
    assert main(argv(folders, out, "--limit", "2", "--save-every", "1")) == 0
    assert seen == INSTRUCTIONS[:2]
    first = {r.id: r.expressive for r in read_jsonl(out)}
    assert sorted(first) == ["ex0", "ex1"]
    assert main(argv(folders, out)) == 0
    assert seen == INSTRUCTIONS  # only the third was computed the second time
    second = {r.id: r.expressive for r in read_jsonl(out)}
    assert sorted(second) == ["ex0", "ex1", "ex2"]
    assert all(second[k] == v for k, v in first.items())
    assert main(argv(folders, out, "--limit", "1")) == 0  # a shorter run keeps what lies past its limit
    assert seen == INSTRUCTIONS and {r.id: r.expressive for r in read_jsonl(out)} == second
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    rows[1]["instruction"] = "an older instruction"  # the data set changed since: recompute that one
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv(folders, out)) == 0
    assert seen == INSTRUCTIONS + INSTRUCTIONS[1:2]
    assert [r.instruction for r in read_jsonl(out)] == INSTRUCTIONS


def test_bfloat16_weights(folders, tmp_path):
    from mgie.data.formats import read_jsonl

    out = tmp_path / "expressive.jsonl"
    assert main(argv(folders, out, "--limit", "1", "--dtype", "bfloat16", "--device", "cpu")) == 0
    assert read_jsonl(out)[0].expressive


def test_empty_model_output_falls_back_to_the_instruction(folders, tmp_path, monkeypatch, capsys):
    from mgie.data.formats import read_jsonl

    out = tmp_path / "expressive.jsonl"
    counting(monkeypatch, lambda ins: ["</s>" if i % 2 else "   " for i in range(len(ins))])
    assert main(argv(folders, out)) == 0
    assert [r.expressive for r in read_jsonl(out)] == INSTRUCTIONS
    assert "note: 3 of 3 examples" in capsys.readouterr().err


def test_parquet_images_are_written_as_pngs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(seed):
        buf = io.BytesIO()
        random_image(20, 16, seed=seed).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    pq.write_table(pa.table({"source_img": [png(0)], "target_img": [png(1)]}), tmp_path / "d.parquet")
    rec = EditRecord(
        id="mb/12:3",
        source=ParquetImage(tmp_path / "d.parquet", 0, "source_img"),
        target=ParquetImage(tmp_path / "d.parquet", 0, "target_img"),
        instruction="make it blue",
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    row = record_dict(rec, out_dir, "A blue scene.")
    assert row["source"].startswith("images/") and row["source"] != row["target"]
    loaded = FileImage(out_dir / row["source"]).load()
    assert loaded.size == (20, 16) and list(loaded.getdata()) == list(rec.source.load().getdata())
    assert row == record_dict(rec, out_dir, "A blue scene.")  # stable names: resume reuses the files


def test_bad_inputs_are_one_line_errors(folders, tmp_path, capsys):
    bad_model = tmp_path / "broken"
    bad_model.mkdir()
    (bad_model / "config.json").write_text("{not json")
    out = tmp_path / "o.jsonl"
    cases = {
        "no such file": ["--data-path", str(tmp_path / "missing")],
        "--mllm": ["--mllm", str(tmp_path / "nope")],
        "cannot load the MLLM": ["--mllm", str(bad_model)],
        "no config.json": ["--summarizer", str(tmp_path)],
        "one of the inputs": ["--out", str(folders["manifest"])],
    }
    for expected, override in cases.items():
        args = argv(folders, out)
        i = args.index(override[0])
        args[i + 1] = override[1]
        assert main(args) == 2, expected
        assert expected in error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:
        main(argv(folders, out, "--batch-size", "0"))
    assert e.value.code == 2
    assert "batch-size" in error_line(capsys.readouterr().err)
    out.write_text("not json\n")
    assert main(argv(folders, out)) == 2
    assert "not a manifest line" in error_line(capsys.readouterr().err)
