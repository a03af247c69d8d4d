"""Readers that turn each public image-editing data set, in the layout its users download, into
:class:`~mgie.data.records.EditRecord` lists. ``docs/datasets.md`` shows each layout as a tree.

What each reader relies on, and where it was read (public sources):

* ``jsonl`` / ``shapes``: our own manifest (one JSON object a line: ``source``, ``target``,
  ``instruction``, optional ``expressive`` and ``id``; image paths relative to the manifest).
* ``ipr2pr``: ``<prompt_dir>/prompt.json`` (``{"edit": ...}``) with ``<seed>_0.jpg`` /
  ``<seed>_1.jpg``, and the optional ``seeds.json`` (``[[prompt_dir, [seed, ...]], ...]``), as
  timothybrooks/instruct-pix2pix ``edit_dataset.py`` reads them. The expressive instructions come
  from ``ipr2pr_expressive.json`` as apple/ml-mgie ``process_data.ipynb`` writes it:
  ``{"<prompt_dir>_<seed>_0": {"instruction": ..., "expressive": ...}}`` (keys
  ``<prompt_dir>_<seed>`` are accepted too). ``split`` is ignored: MGIE trains on all of IPr2Pr
  (IP2P's own 90/5/5 split of ``seeds.json`` is not applied).
* ``magicbrush``: (a) the HF parquet release osunlp/MagicBrush: ``data/train-000NN-of-000MM-<hash>
  .parquet`` and ``data/dev-...parquet`` (file names from the HF repository tree; splits ``train``
  / ``dev`` and columns ``img_id``, ``turn_index``, ``source_img``, ``mask_img``, ``instruction``,
  ``target_img`` seen in public code calling ``load_dataset("osunlp/MagicBrush")``).
  (b) the folder release (the test zip): ``<split>/edit_sessions.json`` =
  ``{img_id: [{"input", "mask", "output", "instruction"}, ...]}`` with files in
  ``<split>/images/<img_id>/`` (OSU-NLP-Group/MagicBrush ``edit_cli_single_multi_turn.py`` and
  public evaluation scripts). Ids are ``<img_id>_<turn>``; folder turns are numbered from 1, as the
  ``<img_id>-output1.png`` names are (assumed to match the parquet ``turn_index``).
* ``gier``: jshi31/T2ONet ``data/GIER/README.md``, ``GIER.py`` and ``define_split.py``: images in
  ``images/``; per split ``splits/<split>_sess_3.json`` (a list of ``{"input", "output",
  "expert_summary": [...], "amateur_summary": [...], ...}``); without it, the full ``GIER.json``
  (``IER2.json`` in the README) is split as ``define_split.py`` does (seed 0, 80/10/10). Requests
  are ``expert_summary + amateur_summary`` (T2ONet's order); ids ``<output stem>_<k>``.
* ``evr``: airsplay/VisualRelationships ``README.md`` and ``data/*.json``: ``train.json`` /
  ``valid.json`` / ``test.json`` lists of ``{"img0", "img1", "sents": [...], "uid"}`` (one sentence
  a pair in train, three in valid/test); ids ``<uid>_<k>``. ASSUMED: the image folder of the
  Google-Drive download; images are looked up in ``images/`` and then next to the JSON files.
* ``ma5k``: jshi31/T2ONet ``data/FiveK/README.md``, ``FiveK.py`` and ``datasets/FiveKdataset.py``:
  ``FiveK.json`` = ``[{"input": "3458_O.jpg", "output": "3458_B.jpg", "request": ...}, ...]``,
  images in ``images/``, per split ``annotations/<split>_sess_1.json`` (or ``splits/...``); without
  them ``FiveK.json`` is split as ``FiveK.py`` does (unique inputs, seed 0, 70/10/20). One request a
  pair; ids ``<output stem>``.

Split names: ``val``/``valid``/``dev``/``validation`` are mapped to each release's own word.
Every problem raises :class:`DataError` with one line naming the file (and item) at fault.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgie.data.records import EditRecord, FileImage, ParquetImage

DATASETS = ("ipr2pr", "magicbrush", "gier", "evr", "ma5k", "jsonl", "shapes")
MANIFEST = "manifest.jsonl"
IP2P_EXPRESSIVE = "ipr2pr_expressive.json"
MAGICBRUSH_COLUMNS = ("img_id", "turn_index", "source_img", "target_img", "instruction")
_VAL = ("val", "valid", "dev", "validation")


class DataError(ValueError):
    """A data set cannot be read; the message is one line naming the file/field at fault."""


# ----------------------------------------------------------------------------- dispatch


def load_records(dataset: str, path: str | Path, split: str = "train") -> list[EditRecord]:
    """All records of ``dataset`` (one of :data:`DATASETS`) stored at ``path`` for ``split``."""
    readers: dict[str, Callable[[Path, str], list[EditRecord]]] = {
        "ipr2pr": read_ip2p,
        "magicbrush": read_magicbrush,
        "gier": read_gier,
        "evr": read_evr,
        "ma5k": read_ma5k,
        "jsonl": lambda p, _s: read_jsonl(p),
        "shapes": lambda p, _s: read_jsonl(p),
    }
    if dataset not in readers:
        raise DataError(f"unknown data set {dataset!r}; expected one of {', '.join(DATASETS)}")
    if not str(path).strip():
        raise DataError(f"no path given for data set {dataset!r} (set data.path)")
    return readers[dataset](Path(path), split)


# ----------------------------------------------------------------------------- shared helpers


def _folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: data folder not found")
    return path


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from err


def _json_of(path: Path, kind: type) -> Any:
    data = _read_json(path)
    if not isinstance(data, kind):
        raise DataError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}")
    return data


def _field(item: Any, key: str, where: str) -> Any:
    if not isinstance(item, dict) or item.get(key) is None:
        raise DataError(f"{where}: missing field {key!r}")
    return item[key]


def _text(item: Any, key: str, where: str) -> str:
    value = _field(item, key, where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string")
    return value.strip()


def _image(path: Path, where: str) -> FileImage:
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    return FileImage(path)


def _locate(name: str, folders: list[Path], where: str) -> FileImage:
    """The first of ``folder / name`` that exists (an absolute ``name`` is used as is)."""
    for folder in folders:
        if (folder / name).is_file():
            return FileImage(folder / name)
    raise DataError(f"{where}: image {name!r} not found in {', '.join(map(str, folders))}")


def _nonempty(records: list[EditRecord], where: Path, split: str | None = None) -> list[EditRecord]:
    if not records:
        raise DataError(f"{where}: no examples found" + (f" for split {split!r}" if split else ""))
    return records


def _sentences(values: Any, where: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise DataError(f"{where}: requests must be a string or a list of strings")
    return [s.strip() for s in values if isinstance(s, str) and s.strip()]


def _pair_records(pair: str, src: FileImage, tgt: FileImage, sentences: list[str]) -> list[EditRecord]:
    """One record per (pair, sentence), ids ``<pair>_<k>``."""
    return [EditRecord(f"{pair}_{k}", src, tgt, s) for k, s in enumerate(sentences)]


# ----------------------------------------------------------------------------- our manifest


def read_jsonl(path: str | Path) -> list[EditRecord]:
    """Our manifest: a ``.jsonl`` file, or a folder holding ``manifest.jsonl``."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file}: manifest not found")
    records: list[EditRecord] = []
    with open(file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                records.append(_manifest_record(line, file.parent, f"{file}:{lineno}", len(records)))
    return _nonempty(records, file)


def _manifest_record(line: str, base: Path, where: str, index: int) -> EditRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    src = _image(base / _text(obj, "source", where), where)
    tgt = _image(base / _text(obj, "target", where), where)
    expressive = obj.get("expressive")
    if expressive is not None and not isinstance(expressive, str):
        raise DataError(f"{where}: field 'expressive' must be a string")
    rid = str(obj["id"]) if obj.get("id") is not None else str(index)
    return EditRecord(rid, src, tgt, _text(obj, "instruction", where), expressive or None)


def write_jsonl(records_as_dicts: list[dict], path: str | Path) -> None:
    """Write our manifest atomically (temporary file + ``os.replace``); a folder gets ``manifest.jsonl``."""
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    for i, rec in enumerate(records_as_dicts):
        missing = [k for k in ("source", "target", "instruction") if k not in rec]
        if missing:
            raise DataError(f"{path}: record {i} lacks {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records_as_dicts:
                fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- InstructPix2Pix


def read_ip2p(root: str | Path, split: str = "train") -> list[EditRecord]:
    """InstructPix2Pix folders (``split`` is ignored: MGIE trains on the whole set)."""
    root = _folder(root)
    seeds = root / "seeds.json"
    pairs = _ip2p_seeds(seeds) if seeds.is_file() else _ip2p_scan(root)
    expressive = _ip2p_expressive(root / IP2P_EXPRESSIVE)
    prompts: dict[str, str] = {}
    records = []
    for name, seed in sorted(pairs):
        folder, rid = root / name, f"{name}_{seed}"
        if name not in prompts:
            prompts[name] = _text(_json_of(folder / "prompt.json", dict), "edit", str(folder / "prompt.json"))
        src = _image(folder / f"{seed}_0.jpg", str(folder))
        tgt = _image(folder / f"{seed}_1.jpg", str(folder))
        records.append(EditRecord(rid, src, tgt, prompts[name], expressive.get(rid)))
    return _nonempty(records, root)


def _ip2p_seeds(path: Path) -> set[tuple[str, str]]:
    pairs = set()
    for i, entry in enumerate(_json_of(path, list)):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            raise DataError(f"{path}: entry {i} is not [prompt_dir, [seeds...]]")
        pairs.update((str(entry[0]), str(seed)) for seed in entry[1])
    return pairs


def _ip2p_scan(root: Path) -> set[tuple[str, str]]:
    return {
        (folder.name, img.name[: -len("_0.jpg")])
        for folder in root.iterdir()
        if (folder / "prompt.json").is_file()
        for img in folder.glob("*_0.jpg")
    }


def _ip2p_expressive(path: Path) -> dict[str, str]:
    """``{record id: expressive}`` from MGIE's file (keys ``<dir>_<seed>_0`` or ``<dir>_<seed>``)."""
    if not path.exists():
        return {}
    out = {}
    for key, value in _json_of(path, dict).items():
        text = value.get("expressive") if isinstance(value, dict) else value
        if isinstance(text, str) and text.strip():
            out[key] = text.strip()
            if key.endswith("_0"):  # MGIE's key is the input image's id, ``<dir>_<seed>_0``
                out.setdefault(key[:-2], text.strip())
    return out


# ----------------------------------------------------------------------------- MagicBrush


def read_magicbrush(root: str | Path, split: str = "train") -> list[EditRecord]:
    """MagicBrush: the folder release (``<split>/edit_sessions.json``) or the HF parquet release."""
    root = _folder(root)
    split = "dev" if split in _VAL else split
    sessions = root / split / "edit_sessions.json"
    if sessions.is_file():
        return _nonempty(_magicbrush_folder(sessions), sessions)
    files = sorted((root / "data").glob(f"{split}-*.parquet")) or sorted(root.glob(f"{split}-*.parquet"))
    if not files:
        raise DataError(f"{root}: neither {split}/edit_sessions.json nor data/{split}-*.parquet found")
    return _nonempty([rec for file in files for rec in _magicbrush_parquet(file)], root, split)


def _magicbrush_folder(sessions: Path) -> list[EditRecord]:
    images, records = sessions.parent / "images", []
    for img_id, turns in _json_of(sessions, dict).items():
        for k, turn in enumerate(turns if isinstance(turns, list) else [turns], 1):
            where = f"{sessions} [{img_id}][{k - 1}]"
            src = _image(images / str(img_id) / _text(turn, "input", where), where)
            tgt = _image(images / str(img_id) / _text(turn, "output", where), where)
            records.append(EditRecord(f"{img_id}_{k}", src, tgt, _text(turn, "instruction", where)))
    return records


def _magicbrush_parquet(file: Path) -> list[EditRecord]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{file}: reading parquet needs pyarrow (pip install pyarrow)") from err
    try:
        names = pq.read_schema(file).names
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{file}: unreadable parquet ({err})") from err
    missing = [c for c in MAGICBRUSH_COLUMNS if c not in names]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(missing)}")
    rows = pq.read_table(file, columns=["img_id", "turn_index", "instruction"]).to_pylist()
    return [
        EditRecord(
            f"{row['img_id']}_{row['turn_index']}",
            ParquetImage(file, i, "source_img"),
            ParquetImage(file, i, "target_img"),
            _text(row, "instruction", f"{file} row {i}"),
        )
        for i, row in enumerate(rows)
    ]


# ----------------------------------------------------------------------------- GIER / MA5k (T2ONet)


Bounds = Callable[[int], tuple[int, int]]  # n -> (end of train, end of val)


def _t2onet_items(
    root: Path, split: str, split_files: list[Path], full: list[Path], bounds: Bounds, by_input: bool
):
    """``(file, items)`` of one split: the released split file, else the full annotation split
    exactly as T2ONet did (numpy seed 0 shuffle of the pairs, or of the unique inputs)."""
    for file in split_files:
        if file.is_file():
            return file, _json_of(file, list)
    file = next((f for f in full if f.is_file()), None)
    if file is None:
        names = ", ".join(str(f.relative_to(root)) for f in split_files + full)
        raise DataError(f"{root}: none of {names} found")
    return file, _seeded_split(file, _json_of(file, list), split, bounds, by_input)


def _seeded_split(file: Path, items: list, split: str, bounds: Bounds, by_input: bool) -> list:
    import numpy as np

    if split not in ("train", "val", "test"):
        raise DataError(f"{file}: unknown split {split!r} (train, val or test)")
    keys = (
        np.unique([_text(it, "input", f"{file} item {i}") for i, it in enumerate(items)])
        if by_input
        else np.arange(len(items))
    )
    np.random.RandomState(0).shuffle(keys)  # the stream of np.random.seed(0); np.random.shuffle
    a, b = bounds(len(keys))
    chosen = {"train": keys[:a], "val": keys[a:b], "test": keys[b:]}[split]
    if by_input:
        wanted = set(chosen.tolist())
        return [it for it in items if it["input"] in wanted]
    return [items[i] for i in chosen]


def _t2onet_split(split: str) -> str:
    return "val" if split in _VAL else split


def read_gier(root: str | Path, split: str = "train") -> list[EditRecord]:
    """GIER (Shi et al. 2020) as released with T2ONet: ``images/``, ``splits/`` or ``GIER.json``."""
    root = _folder(root)
    split = _t2onet_split(split)
    file, items = _t2onet_items(
        root,
        split,
        [root / "splits" / f"{split}_sess_3.json"],
        [root / "GIER.json", root / "IER2.json"],
        lambda n: (int(n * 0.8), int(n * 0.9)),
        by_input=False,
    )
    records = []
    for i, item in enumerate(items):
        where = f"{file} item {i}"
        src_name, tgt_name = (_text(item, k, where).replace("/", "_") for k in ("input", "output"))
        if "expert_summary" not in item and "amateur_summary" not in item:
            raise DataError(f"{where}: missing field 'expert_summary'/'amateur_summary'")
        sents = _sentences(item.get("expert_summary") or [], where)
        sents += _sentences(item.get("amateur_summary") or [], where)
        src = _image(root / "images" / src_name, where)
        tgt = _image(root / "images" / tgt_name, where)
        records += _pair_records(Path(tgt_name).stem, src, tgt, sents)
    return _nonempty(records, file, split)


def read_ma5k(root: str | Path, split: str = "train") -> list[EditRecord]:
    """MA5k-Req (Shi et al. 2022) as released with T2ONet: ``images/``, ``annotations/`` or ``FiveK.json``."""
    root = _folder(root)
    split = _t2onet_split(split)
    name = f"{split}_sess_1.json"
    file, items = _t2onet_items(
        root,
        split,
        [root / "annotations" / name, root / "splits" / name],
        [root / "FiveK.json"],
        lambda n: (int(n * 0.7), int(n * 0.7) + int(n * 0.1)),
        by_input=True,
    )
    seen: Counter[str] = Counter()
    records = []
    for i, item in enumerate(items):
        where = f"{file} item {i}"
        src = _image(root / "images" / _text(item, "input", where), where)
        tgt_name = _text(item, "output", where)
        tgt = _image(root / "images" / tgt_name, where)
        pair = Path(tgt_name).stem
        seen[pair] += 1
        rid = pair if seen[pair] == 1 else f"{pair}_{seen[pair] - 1}"
        records.append(EditRecord(rid, src, tgt, _text(item, "request", where)))
    return _nonempty(records, file, split)


# ----------------------------------------------------------------------------- EVR


def read_evr(root: str | Path, split: str = "train") -> list[EditRecord]:
    """EVR / Image Editing Request (Tan et al. 2019): ``{train,valid,test}.json`` plus the images."""
    root = _folder(root)
    split = "valid" if split in _VAL else split
    candidates = [root / f"{split}.json", root / "data" / f"{split}.json"]
    file = next((f for f in candidates if f.is_file()), candidates[0])
    folders = [root / "images", file.parent / "images", root, file.parent]
    folders = list(dict.fromkeys(folders))
    records = []
    for i, item in enumerate(_json_of(file, list)):
        where = f"{file} item {i}"
        src = _locate(_text(item, "img0", where), folders, where)
        tgt = _locate(_text(item, "img1", where), folders, where)
        records += _pair_records(
            str(_field(item, "uid", where)), src, tgt, _sentences(_field(item, "sents", where), where)
        )
    return _nonempty(records, file, split)
