"""The data set readers, each on a tiny fixture built in its real on-disk format."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgie.data import formats
from mgie.data.formats import DATASETS, DataError, load_records, read_jsonl, write_jsonl
from mgie.data.records import ParquetImage

from .conftest import fixture_path

SIZE = (40, 24)


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = SIZE, mode: str = "RGB") -> Path:
    """A small random image written in the format its suffix names."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def check_images(records, size: tuple[int, int] = SIZE) -> None:
    for rec in records:
        for img in (rec.source.load(), rec.target.load()):
            assert img.mode == "RGB" and img.size == size


# ----------------------------------------------------------------------------- fixtures


def make_ip2p(root: Path) -> Path:
    """Two prompt folders, three pairs, one orphan seed that ``seeds.json`` leaves out."""
    for name, edit, seeds in (
        ("0000001", "make it snow", ["11", "12"]),
        ("0000002", "add a boat", ["7", "99"]),
    ):
        write_json(root / name / "prompt.json", {"input": "a field", "edit": edit, "output": "a snowy field"})
        for seed in seeds:
            save_image(root / name / f"{seed}_0.jpg", 1)
            save_image(root / name / f"{seed}_1.jpg", 2)
    write_json(root / "seeds.json", [["0000001", [11, 12]], ["0000002", [7]]])
    write_json(
        root / "ipr2pr_expressive.json",
        {
            "0000001_11_0": {"instruction": "make it snow", "expressive": "the field is covered in snow"},
            "0000002_7": {"instruction": "add a boat", "expressive": "a red boat floats on the lake"},
        },
    )
    return root


def image_cell(seed: int, fmt: str = "PNG") -> dict:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(buf, fmt)
    return {"bytes": buf.getvalue(), "path": None}


def write_magicbrush_parquet(path: Path, rows: list[tuple[str, int, str]], drop: str | None = None) -> Path:
    """HF ``datasets`` layout: image columns are ``struct<bytes: binary, path: string>``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    n = len(rows)
    columns = {
        "img_id": pa.array([r[0] for r in rows], pa.string()),
        "turn_index": pa.array([r[1] for r in rows], pa.int32()),
        "source_img": pa.array([image_cell(i) for i in range(n)], image),
        "mask_img": pa.array([image_cell(100 + i) for i in range(n)], image),
        "instruction": pa.array([r[2] for r in rows], pa.string()),
        "target_img": pa.array([image_cell(200 + i, "JPEG") for i in range(n)], image),
    }
    columns.pop(drop, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def make_magicbrush_folder(root: Path, split: str = "test") -> Path:
    sessions = {
        "139306": [
            {
                "input": "139306-input.png",
                "mask": "139306-mask1.png",
                "output": "139306-output1.png",
                "instruction": "put a hat on the cat",
            },
            {
                "input": "139306-output1.png",
                "mask": "139306-mask2.png",
                "output": "139306-output2.png",
                "instruction": "make the hat red",
            },
        ],
        "5521": [
            {
                "input": "5521-input.png",
                "mask": "5521-mask1.png",
                "output": "5521-output1.png",
                "instruction": "remove the car",
            }
        ],
    }
    for img_id, turns in sessions.items():
        for k, turn in enumerate(turns):
            for key in ("input", "mask", "output"):
                save_image(
                    root / split / "images" / img_id / turn[key], k, mode="RGBA" if key == "mask" else "RGB"
                )
    write_json(root / split / "edit_sessions.json", sessions)
    return root


GIER_ITEMS = [
    {
        "input": "2vdko4_2vdko4.jpg",
        "output": "2vdko4_WeHiVL3.jpg",
        "segment": "2vdko4/2vdko4.jpg",
        "request": "Could someone please create a blank background?",
        "operator": {"color_bg": {"local": True, "ids": [0, 1]}},
        "expert_summary": ["Please, remove the background", "remove background"],
        "amateur_summary": [" change the background to white"],
    },
    {
        "input": "74fz4_74fz4.jpg",
        "output": "74fz4_fPqNr.png",
        "operator": {"brightness": {"local": False, "ids": []}},
        "expert_summary": ["Add a yellow tone in this photo"],
        "amateur_summary": [],
    },
]


def make_gier(root: Path, items=GIER_ITEMS) -> Path:
    for i, item in enumerate(items):
        save_image(root / "images" / item["input"], i)
        save_image(root / "images" / item["output"], 10 + i)
    write_json(root / "splits" / "train_sess_3.json", items)
    return root


EVR_TRAIN = [
    {
        "img0": "Zhopped.com_gc9hq_gc9hq.jpg",
        "img1": "Zhopped.com_gc9hq_cxyv8.jpg",
        "sents": ["change the back ground"],
        "uid": "Zhopped_2",
    },
    {
        "img0": "Zhopped.com_37dgY_37dgY.jpg",
        "img1": "Zhopped.com_37dgY_8WCbv.png",
        "sents": ["Making dark color "],
        "uid": "Zhopped_11",
    },
]
EVR_VALID = [
    {
        "img0": "Reddit.com_5fdtr1_5fdtr1.jpg",
        "img1": "Reddit.com_5fdtr1_dajgq1u.jpg",
        "sents": ["make color brighter", "Increase the brightness of the image", "add the effect"],
        "uid": "Reddit_1012",
    }
]


def make_evr(root: Path) -> Path:
    for i, item in enumerate(EVR_TRAIN + EVR_VALID):
        save_image(root / "images" / item["img0"], i)
        save_image(root / "images" / item["img1"], 10 + i)
    write_json(root / "train.json", EVR_TRAIN)
    write_json(root / "valid.json", EVR_VALID)
    return root


MA5K_ITEMS = [
    {"input": "3458_O.jpg", "output": "3458_B.jpg", "request": "Image needsTo be soften and sharpened"},
    {
        "input": "0591_O.jpg",
        "output": "0591_A.jpg",
        "request": "Please brighten the image just a little bit.",
    },
    {
        "input": "0591_O.jpg",
        "output": "0591_C.jpg",
        "request": "Increase the brightness of this image by a lot.",
    },
]


def make_ma5k(root: Path, items=MA5K_ITEMS, split_file: bool = True) -> Path:
    for i, item in enumerate(items):
        save_image(root / "images" / item["input"], i)
        save_image(root / "images" / item["output"], 10 + i)
    write_json(root / "FiveK.json", items)
    if split_file:
        write_json(
            root / "annotations" / "train_sess_1.json", [dict(it, request_idx=[1, 5, 2]) for it in items]
        )
    return root


def make_manifest(root: Path) -> Path:
    save_image(root / "img" / "a_src.png", 1)
    save_image(root / "img" / "a_tgt.png", 2)
    absolute = save_image(root.parent / "elsewhere" / "b.jpg", 3)
    lines = [
        {
            "source": "img/a_src.png",
            "target": "img/a_tgt.png",
            "instruction": "make the sky blue",
            "id": "a",
            "world": 3,
        },
        {
            "source": str(absolute),
            "target": "img/a_tgt.png",
            "instruction": "remove the square",
            "expressive": "the red square is gone",
        },
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    return root


# ----------------------------------------------------------------------------- readers


def test_ip2p_layout_seeds_and_expressive(tmp_path):
    recs = load_records("ipr2pr", make_ip2p(tmp_path / "ip2p"))
    assert [r.id for r in recs] == ["0000001_11", "0000001_12", "0000002_7"]  # seed 99 is not in seeds.json
    assert [r.instruction for r in recs] == ["make it snow", "make it snow", "add a boat"]
    assert [r.expressive for r in recs] == [
        "the field is covered in snow",
        None,
        "a red boat floats on the lake",
    ]
    check_images(recs)


def test_ip2p_without_seeds_json_scans_folders(tmp_path):
    root = make_ip2p(tmp_path / "ip2p")
    (root / "seeds.json").unlink()
    assert [r.id for r in formats.read_ip2p(root)] == ["0000001_11", "0000001_12", "0000002_7", "0000002_99"]


def test_ip2p_real_sample():
    root = fixture_path("ip2p_sample")
    recs = load_records("ipr2pr", root, "train")
    edits = {d: json.loads((root / d / "prompt.json").read_text())["edit"] for d in ("0000132", "0000145")}
    assert len(recs) == 4 and [r.id for r in recs] == sorted(r.id for r in recs)
    assert all(r.instruction == edits[r.id.split("_")[0]] and r.expressive is None for r in recs)
    img = recs[0].source.load()
    assert img.mode == "RGB" and img.size == recs[0].target.load().size


def test_magicbrush_parquet(tmp_path):
    root = tmp_path / "MagicBrush"
    write_magicbrush_parquet(
        root / "data" / "train-00000-of-00002-aaaa.parquet",
        [("327726", 1, "let the dog wear a hat"), ("327726", 2, "make the hat blue"), ("12", 1, "add snow")],
    )
    write_magicbrush_parquet(
        root / "data" / "train-00001-of-00002-bbbb.parquet", [("99", 1, "remove the cup")]
    )
    write_magicbrush_parquet(root / "data" / "dev-00000-of-00001-cccc.parquet", [("5", 1, "paint it red")])
    recs = load_records("magicbrush", root, "train")
    assert [r.id for r in recs] == ["327726_1", "327726_2", "12_1", "99_1"]
    assert recs[1].instruction == "make the hat blue" and recs[1].expressive is None
    assert recs[2].source == ParquetImage(recs[2].source.path, 2, "source_img")  # third row, second row group
    check_images(recs)
    assert pickle.loads(pickle.dumps(recs)) == recs
    assert [r.id for r in load_records("magicbrush", root, "dev")] == ["5_1"]
    assert [r.id for r in load_records("magicbrush", root, "val")] == ["5_1"]


def test_magicbrush_parquet_in_root_and_missing_column(tmp_path):
    write_magicbrush_parquet(tmp_path / "train-00000-of-00001.parquet", [("1", 1, "add a tree")])
    assert [r.id for r in formats.read_magicbrush(tmp_path)] == ["1_1"]
    bad = write_magicbrush_parquet(
        tmp_path / "x" / "data" / "train-0.parquet", [("1", 1, "a")], drop="target_img"
    )
    with pytest.raises(DataError, match=r"train-0\.parquet: missing column\(s\) target_img"):
        formats.read_magicbrush(bad.parent.parent)


def test_magicbrush_folder_release(tmp_path):
    root = make_magicbrush_folder(tmp_path / "mb")
    recs = load_records("magicbrush", root, "test")
    assert [r.id for r in recs] == ["139306_1", "139306_2", "5521_1"]
    assert [r.instruction for r in recs] == ["put a hat on the cat", "make the hat red", "remove the car"]
    assert recs[1].source.path.name == "139306-output1.png"
    check_images(recs)


def test_gier(tmp_path):
    recs = load_records("gier", make_gier(tmp_path / "GIER"), "train")
    assert [r.id for r in recs] == [
        "2vdko4_WeHiVL3_0",
        "2vdko4_WeHiVL3_1",
        "2vdko4_WeHiVL3_2",
        "74fz4_fPqNr_0",
    ]
    assert recs[2].instruction == "change the background to white"  # amateur after expert, stripped
    assert recs[3].instruction == "Add a yellow tone in this photo" and recs[0].expressive is None
    check_images(recs)


def test_gier_full_annotation_is_split_like_t2onet(tmp_path):
    items = [dict(GIER_ITEMS[1], input=f"p{i}_p{i}.jpg", output=f"p{i}_o{i}.jpg") for i in range(10)]
    root = make_gier(tmp_path / "GIER", items)
    (root / "splits" / "train_sess_3.json").unlink()
    write_json(root / "GIER.json", items)
    order = np.arange(10)
    np.random.seed(0)
    np.random.shuffle(order)  # T2ONet define_split.py
    ids = {s: [r.id for r in load_records("gier", root, s)] for s in ("train", "val", "test")}
    assert ids["train"] == [f"p{i}_o{i}_0" for i in order[:8]]
    assert ids["val"] == [f"p{order[8]}_o{order[8]}_0"] and ids["test"] == [f"p{order[9]}_o{order[9]}_0"]


def test_evr(tmp_path):
    root = make_evr(tmp_path / "evr")
    train = load_records("evr", root, "train")
    assert [(r.id, r.instruction) for r in train] == [
        ("Zhopped_2_0", "change the back ground"),
        ("Zhopped_11_0", "Making dark color"),
    ]
    valid = load_records("evr", root, "val")
    assert [r.id for r in valid] == ["Reddit_1012_0", "Reddit_1012_1", "Reddit_1012_2"]
    assert valid[1].instruction == "Increase the brightness of the image"
    check_images(train + valid)


def test_ma5k(tmp_path):
    recs = load_records("ma5k", make_ma5k(tmp_path / "FiveK"), "train")
    assert [r.id for r in recs] == ["3458_B", "0591_A", "0591_C"]
    assert (
        recs[2].instruction == "Increase the brightness of this image by a lot."
        and recs[0].expressive is None
    )
    check_images(recs)


def test_ma5k_without_split_files_splits_unique_inputs(tmp_path):
    items = [
        {"input": f"{i:04d}_O.jpg", "output": f"{i:04d}_{e}.jpg", "request": f"r{i}{e}"}
        for i in range(10)
        for e in "AB"
    ]
    root = make_ma5k(tmp_path / "FiveK", items, split_file=False)
    inputs = np.unique([it["input"] for it in items])
    np.random.seed(0)
    np.random.shuffle(inputs)  # T2ONet data/FiveK/FiveK.py
    for split, chosen in (("train", inputs[:7]), ("val", inputs[7:8]), ("test", inputs[8:])):
        expected = [it["output"][:-4] for it in items if it["input"] in set(chosen)]
        assert [r.id for r in load_records("ma5k", root, split)] == expected


def test_jsonl_and_shapes(tmp_path):
    root = make_manifest(tmp_path / "world")
    for recs in (read_jsonl(root), read_jsonl(root / "manifest.jsonl"), load_records("shapes", root)):
        assert [r.id for r in recs] == ["a", "1"]
        assert [r.expressive for r in recs] == [None, "the red square is gone"]
        assert recs[1].source.path == tmp_path / "elsewhere" / "b.jpg"
        check_images(recs)


def test_write_jsonl_round_trip_is_atomic(tmp_path):
    save_image(tmp_path / "s.png")
    save_image(tmp_path / "t.png", 1)
    rows = [
        {
            "source": "s.png",
            "target": Path("t.png"),
            "instruction": "make it blue",
            "expressive": "a blue façade",
        }
    ]
    write_jsonl(rows, tmp_path / "manifest.jsonl")
    write_jsonl(rows * 2, tmp_path / "manifest.jsonl")  # replaces the file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "s.png", "t.png"]
    recs = load_records("jsonl", tmp_path)
    assert len(recs) == 2 and recs[0].expressive == "a blue façade"
    with pytest.raises(DataError, match="record 0 lacks instruction"):
        write_jsonl([{"source": "s.png", "target": "t.png"}], tmp_path / "other.jsonl")
    assert not (tmp_path / "other.jsonl").exists()


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_and_empty_path(tmp_path):
    with pytest.raises(DataError, match="unknown data set 'coco'"):
        load_records("coco", tmp_path)
    with pytest.raises(DataError, match="data.path"):
        load_records("ipr2pr", "")
    assert set(DATASETS) == {"ipr2pr", "magicbrush", "gier", "evr", "ma5k", "jsonl", "shapes"}


@pytest.mark.parametrize("dataset", DATASETS)
def test_missing_folder(tmp_path, dataset):
    with pytest.raises(DataError, match="nowhere"):
        load_records(dataset, tmp_path / "nowhere")


@pytest.mark.parametrize("dataset", ["ipr2pr", "magicbrush", "gier", "evr", "ma5k", "jsonl"])
def test_empty_folder(tmp_path, dataset):
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        load_records(dataset, tmp_path)


def _drop_field(path: Path, key: str, index: int = 0) -> None:
    data = json.loads(path.read_text())
    item = data[index] if isinstance(data, list) else data["139306"][index]
    del item[key]
    path.write_text(json.dumps(data))


MISSING_FIELD = {
    "gier": (make_gier, "splits/train_sess_3.json", "output", "train"),
    "evr": (make_evr, "train.json", "sents", "train"),
    "ma5k": (make_ma5k, "annotations/train_sess_1.json", "request", "train"),
    "magicbrush": (make_magicbrush_folder, "test/edit_sessions.json", "instruction", "test"),
}


@pytest.mark.parametrize("dataset", sorted(MISSING_FIELD))
def test_missing_field(tmp_path, dataset):
    make, rel, key, split = MISSING_FIELD[dataset]
    root = make(tmp_path / dataset)
    _drop_field(root / rel, key)
    with pytest.raises(DataError, match=rf"{Path(rel).name}.*missing field '{key}'"):
        load_records(dataset, root, split)


def test_missing_field_ip2p_and_jsonl(tmp_path):
    root = make_ip2p(tmp_path / "ip2p")
    write_json(root / "0000002" / "prompt.json", {"input": "a lake"})
    with pytest.raises(DataError, match=r"0000002/prompt\.json: missing field 'edit'"):
        load_records("ipr2pr", root)
    world = make_manifest(tmp_path / "world")
    (world / "manifest.jsonl").write_text('{"source": "img/a_src.png", "target": "img/a_tgt.png"}\n')
    with pytest.raises(DataError, match=r"manifest\.jsonl:1: missing field 'instruction'"):
        load_records("jsonl", world)
    (world / "manifest.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"manifest\.jsonl:1: invalid JSON"):
        load_records("jsonl", world)


MISSING_IMAGE = {
    "ipr2pr": (make_ip2p, "0000002/7_1.jpg", "train"),
    "gier": (make_gier, "images/74fz4_fPqNr.png", "train"),
    "evr": (make_evr, "images/Reddit.com_5fdtr1_dajgq1u.jpg", "valid"),
    "ma5k": (make_ma5k, "images/3458_O.jpg", "train"),
    "magicbrush": (make_magicbrush_folder, "test/images/5521/5521-output1.png", "test"),
    "jsonl": (make_manifest, "img/a_tgt.png", "train"),
}


@pytest.mark.parametrize("dataset", sorted(MISSING_IMAGE))
def test_missing_image(tmp_path, dataset):
    make, rel, split = MISSING_IMAGE[dataset]
    root = make(tmp_path / dataset)
    (root / rel).unlink()
    with pytest.raises(DataError, match=Path(rel).name):
        load_records(dataset, root, split)


def test_empty_annotations(tmp_path):
    root = make_evr(tmp_path / "evr")
    write_json(root / "train.json", [])
    with pytest.raises(DataError, match=r"train\.json: no examples found for split 'train'"):
        load_records("evr", root)
    world = make_manifest(tmp_path / "world")
    (world / "manifest.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples found"):
        load_records("shapes", world)


def test_magicbrush_missing_split(tmp_path):
    write_magicbrush_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [("1", 1, "add a tree")])
    with pytest.raises(DataError, match=r"neither test/edit_sessions\.json nor data/test-\*\.parquet"):
        load_records("magicbrush", tmp_path, "test")
