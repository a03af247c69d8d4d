import hashlib
import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest

from mgie.data import shapes
from mgie.data.shapes import FAMILIES, HELDOUT_COMBOS, KIND_OF, generate, make_edit, render
from mgie.metrics import CHECKS, edit_anatomy, edit_checks, edit_success


def _digest(img) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_generation_is_deterministic_and_targets_render_identically():
    a, b = generate(60, seed=3), generate(60, seed=3)
    assert [(x.instruction, x.expressive) for x in a] == [(x.instruction, x.expressive) for x in b]
    for x, y in zip(a, b):
        assert _digest(render(x.target)) == _digest(render(y.target)) == _digest(render(x.target))
    assert [x.instruction for x in generate(60, seed=4)] != [x.instruction for x in a]


def test_kinds_are_balanced_and_every_edit_occurs():
    ex = generate(900, seed=0)
    kinds = [KIND_OF[e.edit] for e in ex]
    assert {k: kinds.count(k) for k in set(kinds)} == {"local": 300, "global": 300, "ambiguous": 300}
    assert {e.edit for e in ex} == set(FAMILIES)


def test_edit_weights_scale_the_shares_and_keep_the_splits():
    base = shapes.edit_shares()
    assert math.isclose(sum(base.values()), 1.0) and math.isclose(base["add"], 1 / 15)
    assert math.isclose(base["invert"], 1 / 18)
    w = {"add": 3.0, "invert": 0.0}
    shares = shapes.edit_shares(w)
    total = 1 - base["invert"] + 2 * base["add"]  # independent recomputation of the renormaliser
    assert math.isclose(shares["add"], 3 * base["add"] / total) and shares["invert"] == 0
    assert math.isclose(shares["move"], base["move"] / total)
    ex = generate(3000, seed=2, weights=w)
    counts = {e: sum(x.edit == e for x in ex) for e in FAMILIES}
    assert counts["invert"] == 0
    for e, share in shares.items():  # binomial: within 4.5 standard deviations
        assert abs(counts[e] - 3000 * share) <= 4.5 * math.sqrt(3000 * share * (1 - share)) + 1, e
    assert [x.instruction for x in ex[:40]] == [x.instruction for x in generate(40, seed=2, weights=w)]
    for e in ex:  # reweighting never lets a held-out family or combination into train
        assert e.family != len(FAMILIES[e.edit]) - 1 and (e.edit, e.target_shape) not in HELDOUT_COMBOS
    with pytest.raises(ValueError, match="unknown edit"):
        shapes.edit_shares({"paint": 2.0})
    with pytest.raises(ValueError, match=">= 0"):
        shapes.edit_shares({"add": -1.0})
    with pytest.raises(ValueError, match="no edit"):
        shapes.edit_shares(dict.fromkeys(FAMILIES, 0.0))


def test_cli_edit_weights(tmp_path, capsys):
    from mgie.data.formats import read_jsonl

    out = tmp_path / "w"
    assert shapes.main(["--out", str(out), "--n", "30", "--edit-weights", "add=1,move=0", "--quiet"]) == 0
    assert "edit shares: recolour" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(read_jsonl(out)) == 30 and all(r["edit"] != "move" for r in rows)
    for bad in ("add", "add=x", "paint=2", "add=-1"):
        with pytest.raises(SystemExit) as e:
            shapes.main(["--out", str(tmp_path / "b"), "--n", "3", "--edit-weights", bad])
        assert e.value.code == 2
        assert "--edit-weights" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_splits_hold_out_families_and_combinations():
    for split in ("train", "test", "heldout_paraphrase", "heldout_combo"):
        for e in generate(300, seed=1, split=split):
            last = e.family == len(FAMILIES[e.edit]) - 1
            combo = (e.edit, e.target_shape) in HELDOUT_COMBOS
            assert (last, combo) == {
                "train": (False, False),
                "test": (False, False),
                "heldout_paraphrase": (True, False),
                "heldout_combo": (False, True),
            }[split]
    train = {x.instruction for x in generate(300, seed=1)}
    held = {x.instruction for x in generate(300, seed=1, split="heldout_paraphrase")}
    assert not train & held


def test_heldout_paraphrases_recombine_words_seen_in_training():
    """A model trained from scratch cannot know an unseen word: every word of a held-out
    instruction occurs in the training text (instructions or expressive targets), yet no held-out
    instruction template is a training one."""
    import re

    train = generate(3000, seed=0)
    seen = {w for e in train for text in (e.instruction, e.expressive) for w in re.findall(r"[a-z]+", text)}
    for e in generate(600, seed=0, split="heldout_paraphrase"):
        assert set(re.findall(r"[a-z]+", e.instruction)) <= seen, e.instruction
    train_templates = {FAMILIES[e.edit][e.family] for e in train}
    assert all(FAMILIES[edit][-1] not in train_templates for edit in FAMILIES)


def test_captions_name_every_object_and_change_nothing():
    ex = generate(50, seed=0, split="caption")
    assert [e.expressive for e in ex] == [e.expressive for e in generate(50, seed=0, split="caption")]
    for e in ex:
        assert e.target == e.source and e.edit == "describe" and KIND_OF[e.edit] == "caption"
        parts = e.expressive.split(", ")
        assert len(parts) == len(e.source.objects) + 1
        for o, part in zip(e.source.objects, parts):
            assert part == f"a {o.size} {o.color} {o.shape} in the {shapes.CORNERS[o.cell]}"
        assert parts[-1].endswith(f"{e.source.background} background")


def test_added_objects_sit_where_the_instruction_says():
    """ "add ... in the top left" fixes the target: the new object is centred in that cell, so
    the ground truth follows from the image and the instruction alone."""
    rng = random.Random(7)
    for _ in range(40):
        e = make_edit(rng, "add", 0)
        if e is None:
            continue
        (new,) = set(e.target.objects) - set(e.source.objects)
        assert (new.dx, new.dy, new.size) == (0, 0, "medium")
        assert shapes.CORNERS[new.cell] in e.instruction


@pytest.mark.parametrize("family", range(len(FAMILIES["resize"])))
def test_resize_instructions_name_the_size_the_object_ends_with(family):
    """A resize is one step; an instruction that names a size ("change the size of the red square
    to medium") names the target's, and one that names a direction ("make it bigger", "shrink it")
    names the step's, so the target follows from the words (it once said "to small" for large ->
    medium)."""
    rng, seen = random.Random(11), set()
    for _ in range(200):
        e = make_edit(rng, "resize", family)
        if e is None:
            continue
        (old,) = set(e.source.objects) - set(e.target.objects)
        (new,) = set(e.target.objects) - set(e.source.objects)
        order = list(shapes.SIDES)
        step = order.index(new.size) - order.index(old.size)
        words = e.instruction.split()
        assert abs(step) == 1 and e.expressive.endswith(new.size)
        named = [w for w in words if w in shapes.SIDES]
        if "{adj}" in FAMILIES["resize"][family]:
            assert named == [new.size], e.instruction
        else:
            assert not named and bool({"bigger", "enlarge"} & set(words)) == (step == 1), e.instruction
        seen.add((old.size, new.size))
    assert len(seen) == 4  # small -> medium, medium -> large, and back


def test_ground_truth_is_consistent():
    """The target differs from the source where the expressive text says, and only there."""
    for e in generate(300, seed=2):
        s, t = np.asarray(render(e.source), dtype=int), np.asarray(render(e.target), dtype=int)
        changed = np.abs(s - t).max(-1) > 0
        assert changed.any(), e.instruction
        if e.edit in ("recolour", "remove", "move", "resize", "add", "odd_one_out", "biggest", "smallest"):
            assert changed.mean() < 0.35, e.instruction  # a local edit touches one object
            assert e.target_shape in e.expressive
            words = e.expressive.split()
            changed_obj = {o for o in e.source.objects} ^ {o for o in e.target.objects}
            assert changed_obj and all(o.shape in words for o in changed_obj)
        if e.edit in ("recolour", "odd_one_out", "smallest"):
            new = e.expressive.split()[-1]
            assert (
                new in shapes.COLORS and np.isclose(t[changed], shapes.COLORS[new]).all(axis=-1).mean() > 0.9
            )
        if e.edit in ("brightness", "contrast", "invert", "tint", "sea", "night"):
            assert changed.mean() > 0.5, e.instruction  # global edits touch most pixels
        if e.edit == "grayscale":
            assert (t == t[..., :1]).all()
        assert e.expressive.split()[0] in (
            "change",
            "remove",
            "move",
            "make",
            "add",
            "increase",
            "decrease",
            "turn",
            "invert",
            "tint",
        )


def test_global_operations_exact():
    img = np.array([[[0, 100, 255], [128, 128, 128]]], dtype=np.uint8)
    assert shapes.apply_op(img, "invert", "").tolist() == [[[255, 155, 0], [127, 127, 127]]]
    assert shapes.apply_op(img, "brightness", "up").tolist() == [[[0, 135, 255], [173, 173, 173]]]
    gray = shapes.apply_op(img, "grayscale", "")
    assert gray[0, 0].tolist() == [88, 88, 88]  # round(0.587 * 100 + 0.114 * 255) = 88


def test_cli_writes_manifest_and_images(tmp_path):
    from mgie.data.formats import read_jsonl

    assert shapes.main(["--out", str(tmp_path / "w"), "--n", "12", "--seed", "5", "--quiet"]) == 0
    recs = read_jsonl(tmp_path / "w")
    rows = [json.loads(x) for x in (tmp_path / "w" / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and recs[0].source.load().size == (64, 64)
    assert {"kind", "edit", "family", "split", "scene", "target_scene"} <= set(rows[0])
    assert shapes.main(["--out", str(tmp_path / "w"), "--n", "3"]) == 2  # never overwrites


# ----------------------------------------------------------------------------- success checker


def _example(edit: str, seed: int = 0):
    rng = random.Random(seed)
    while (e := make_edit(rng, edit, 0)) is None:
        pass
    return e


@pytest.mark.parametrize("edit", list(FAMILIES))
def test_checker_accepts_the_ground_truth_and_rejects_no_edit(edit):
    e = _example(edit)
    src, tgt = render(e.source), render(e.target)
    assert edit_success(src, tgt, tgt)
    assert not edit_success(src, tgt, src)


def _wrong_object(e, **change):
    """The source with the edit applied to another object than the right one."""
    others = [o for o in e.source.objects if o not in e.target.objects]
    wrong = next(o for o in e.source.objects if o not in others)
    objs = tuple(replace(o, **change) if o == wrong else o for o in e.source.objects)
    return render(replace(e.source, objects=objs))


def test_checker_rejects_wrong_local_and_ambiguous_edits():
    rng = random.Random(0)
    for edit in ("recolour", "odd_one_out", "smallest"):
        for _ in range(20):
            e = make_edit(rng, edit, 0)
            if e is None or len(e.source.objects) < 2:
                continue
            src, tgt = render(e.source), render(e.target)
            new = e.expressive.split()[-1]
            assert not edit_success(src, tgt, _wrong_object(e, color=new)), e.instruction  # wrong object
            moved = [o for o in e.target.objects if o not in e.source.objects][0]
            wrong_colour = next(c for c in shapes.COLORS if c not in (new, moved.color))
            objs = tuple(replace(o, color=wrong_colour) if o == moved else o for o in e.target.objects)
            assert not edit_success(src, tgt, render(replace(e.target, objects=objs))), e.instruction
    e = _example("move", 3)
    src, tgt = render(e.source), render(e.target)
    o = [x for x in e.target.objects if x not in e.source.objects][0]
    free = [c for c in range(4) if c not in {x.cell for x in e.target.objects} and c != o.cell]
    if free:  # moved to another corner than asked
        objs = tuple(replace(x, cell=free[0]) if x == o else x for x in e.target.objects)
        assert not edit_success(src, tgt, render(replace(e.target, objects=objs)))


def test_checker_rejects_wrong_global_edits():
    e = _example("brightness", 1)
    src, tgt = render(e.source), render(e.target)
    wrong_dir = "down" if e.target.ops[0][1] == "up" else "up"
    assert not edit_success(src, tgt, render(replace(e.source, ops=(("brightness", wrong_dir),))))
    half = np.asarray(tgt).copy()
    half[:, 32:] = np.asarray(src)[:, 32:]  # only half the image edited
    from PIL import Image

    assert not edit_success(src, tgt, Image.fromarray(half))
    e = _example("tint", 2)
    src, tgt = render(e.source), render(e.target)
    other = next(c for c in shapes.COLORS if c != e.target.ops[0][1])
    assert not edit_success(src, tgt, render(replace(e.source, ops=(("tint", other),))))


def test_each_check_by_hand():
    """Each check of edit success fails alone on an output built to break it, and passes just inside."""
    from PIL import Image

    def run(out):
        return edit_checks(*(Image.fromarray(x) for x in (src, tgt, out)))

    src = np.zeros((40, 40, 3), np.uint8)
    tgt = src.copy()
    tgt[4:12, 4:12] = 255  # R: an 8 x 8 block (64 px) turned white; K: 40 x 40 minus the dilated 12 x 12
    keep = 1600 - 144
    assert run(tgt) == dict.fromkeys(CHECKS, True)
    assert run(src) == {"kept": True, "no_stray": True, "reach": False, "near": False, "closer": False}
    # 0.35 of the way short is the limit of reach and 0.08 that of near: a 0.07 shortfall passes
    # both, a 0.10 shortfall fails near only (0.10 <= 0.35 of the way)
    for short, want in ((18, True), (26, False)):  # 18 / 255 = 0.07, 26 / 255 = 0.10
        out = tgt.copy()
        out[4:12, 4:12] = 255 - short
        got = run(out)
        assert got["near"] is want and got["reach"] and got["closer"] and got["kept"] and got["no_stray"]
    out = tgt.copy()
    out[4:6, 4:12] = 0  # a quarter of R left as it was: error 0.25 (within reach), 75% nearer (< 80%)
    assert run(out) == {"kept": True, "no_stray": True, "reach": True, "near": False, "closer": False}
    out[4:8, 4:12] = 0  # half of R: error 0.5 > 0.35 of the way
    assert run(out) == {"kept": True, "no_stray": True, "reach": False, "near": False, "closer": False}
    # stray: at most 2% of K may change by more than 0.2
    n_ok = int(0.02 * keep)  # 29 pixels
    for n, want in ((n_ok, True), (n_ok + 1, False)):
        out = tgt.copy().reshape(-1, 3)
        far = np.flatnonzero(~np.pad(np.ones((12, 12), bool), ((2, 26), (2, 26))).reshape(-1))[:n]
        out[far] = 128  # 0.5 of a change each
        got = run(out.reshape(40, 40, 3))
        assert got["no_stray"] is want and got["kept"] and got["reach"], n
    # kept: a faint change (0.05, under 0.2 so no pixel strays) over nearly all of K
    out = tgt.copy()
    out[14:, :] = 13  # 1,404 of K's 1,456 pixels: mean 0.049
    out[:14, 14:] = 13
    got = run(out)
    assert not got["kept"] and got["no_stray"] and got["reach"] and got["near"]
    assert edit_success(*(Image.fromarray(x) for x in (src, tgt, out))) is False


# ----------------------------------------------------------------------------- failure anatomy


def test_anatomy_by_hand():
    from PIL import Image

    src = np.zeros((16, 16, 3), np.uint8)
    tgt = src.copy()
    tgt[2:6, 2:6] = 255  # R: a 4 x 4 block turned white
    half = src.copy()
    half[2:6, 2:6] = 102  # 0.4 of the way there
    half[12:16, 12:16] = 51  # and a 4 x 4 block changed by 0.2, far from R
    a = edit_anatomy(*(Image.fromarray(x) for x in (src, tgt, half)))
    keep = 256 - 64  # pixels farther than 2 px from R: 16 x 16 minus the dilated 8 x 8
    assert a["moved"] == pytest.approx(0.4) and a["reach"] == pytest.approx(0.4)
    assert a["spill"] == pytest.approx(16 * 0.2 / keep)
    grey, white, black = (np.full((16, 16, 3), v, np.uint8) for v in (128, 255, 0))
    away = edit_anatomy(*(Image.fromarray(x) for x in (grey, white, black)))  # R is the whole image
    assert away["moved"] == pytest.approx(128 / 127) and away["reach"] == pytest.approx(1 - 255 / 127)
    assert math.isnan(away["spill"])
    same = edit_anatomy(*(Image.fromarray(x) for x in (src, src, src)))
    assert math.isnan(same["moved"]) and math.isnan(same["reach"]) and same["spill"] == 0


def test_anatomy_tells_a_wrong_colour_from_a_wrong_object():
    rng = random.Random(1)
    checked = 0
    while checked < 10:
        e = make_edit(rng, "recolour", 0)
        if e is None or len(e.source.objects) < 2:
            continue
        src, tgt = render(e.source), render(e.target)
        right = edit_anatomy(src, tgt, tgt)
        assert right == {"moved": pytest.approx(1.0), "reach": pytest.approx(1.0), "spill": 0.0}
        assert edit_anatomy(src, tgt, src) == {"moved": 0.0, "reach": 0.0, "spill": 0.0}
        new = e.expressive.split()[-1]
        changed = [o for o in e.target.objects if o not in e.source.objects][0]
        was = [o for o in e.source.objects if o not in e.target.objects][0].color
        other = next(c for c in shapes.COLORS if c not in (new, was))
        objs = tuple(replace(o, color=other) if o == changed else o for o in e.target.objects)
        colour = edit_anatomy(src, tgt, render(replace(e.target, objects=objs)))
        assert colour["moved"] > 0.3 and colour["reach"] < 0.7 and colour["spill"] == 0, e.instruction
        obj = edit_anatomy(src, tgt, _wrong_object(e, color=new))
        assert obj["moved"] == 0 and obj["reach"] == 0 and obj["spill"] > 0, e.instruction
        checked += 1


def test_corner_probe_finds_the_quadrants_an_add_changed():
    """train/corner_probe.py's check on rendered scenes: adding an object in a corner changes
    that quadrant alone; a global edit changes all four; nothing changes none."""
    from train.corner_probe import changed_quadrants

    src = shapes.Scene("white", "plain", (shapes.Obj("square", "red", "large", 0),))
    for cell in (1, 2, 3):
        tgt = shapes._swap(src, None, shapes.Obj("circle", "blue", "medium", cell))
        assert changed_quadrants(shapes.render(src), shapes.render(tgt)) == [k == cell for k in range(4)]
    inverted = replace(src, ops=(("invert", ""),))
    assert changed_quadrants(shapes.render(src), shapes.render(inverted)) == [True] * 4
    assert changed_quadrants(shapes.render(src), shapes.render(src)) == [False] * 4


def test_word_distance_against_known_cases():
    d = shapes.word_distance
    assert d([], []) == 0 and d("a b c".split(), []) == 3 and d([], ["x"]) == 1
    # make [-it] a negative [+of] [+it]
    assert d("make it a negative".split(), "make a negative of it".split()) == 3
    assert d("give it {more} contrasty".split(), "give it {more} contrast".split()) == 1
    assert d("put the {name} in the {corner}".split(), "move the {name} to the {corner}".split()) == 2
    rng = random.Random(0)
    for _ in range(50):  # symmetric, and the triangle inequality holds
        a, b, c = ([rng.choice("xyz") for _ in range(rng.randint(0, 5))] for _ in range(3))
        assert d(a, b) == d(b, a) <= max(len(a), len(b))
        assert d(a, c) <= d(a, b) + d(b, c)


def test_lead_swaps_reword_seen_templates_and_stay_away_from_held_out_ones():
    heldout = [f[-1].split() for f in FAMILIES.values()]
    family_templates = {t for f in FAMILIES.values() for t in f}
    all_swaps = [t for ts in shapes.LEAD_SWAPS.values() for t in ts]
    assert len(all_swaps) == len(set(all_swaps)) > 40 and not set(all_swaps) & family_templates
    seen_words = {w for f in FAMILIES.values() for t in f[:-1] for w in t.split()}
    for edit, swaps in shapes.LEAD_SWAPS.items():
        for t in swaps:
            lead, *rest = t.split()
            assert lead in shapes.NEUTRAL_LEADS and set(t.split()) <= seen_words, t
            # the same words after the lead as one of the edit's seen templates with a neutral lead
            assert any(
                f.split()[1:] == rest and f.split()[0] in shapes.NEUTRAL_LEADS for f in FAMILIES[edit][:-1]
            ), t
            assert min(shapes.word_distance(t.split(), h) for h in heldout) >= 2, t
    # the wordings that a verb used to give away now open other edits too
    assert {"give", "put"} <= {t.split()[0] for t in shapes.LEAD_SWAPS["invert"]}
    assert not shapes.LEAD_SWAPS["move"] and not shapes.LEAD_SWAPS["remove"]  # their verbs name the operation
    # and no instruction drawn with swaps is a held-out one or within a word of one
    # (the seen families themselves are a word away from the held-out ones by design: "put a" / "paint a")
    drawn = generate(1500, seed=5, lead_swap=1.0)
    held = [x.instruction.split() for x in generate(300, seed=5, split="heldout_paraphrase")]
    for e in drawn:
        assert e.family != len(FAMILIES[e.edit]) - 1 and (e.edit, e.target_shape) not in HELDOUT_COMBOS
        assert (e.family >= len(FAMILIES[e.edit])) == bool(shapes.LEAD_SWAPS[e.edit])
        if shapes.LEAD_SWAPS[e.edit]:
            assert min(shapes.word_distance(e.instruction.split(), h) for h in held) >= 2, e.instruction


def test_lead_swap_share_determinism_and_limits():
    import re

    plain = generate(400, seed=8, weights={"add": 2.0})
    assert [x.instruction for x in generate(400, seed=8, weights={"add": 2.0}, lead_swap=0.0)] == [
        x.instruction for x in plain
    ]
    a = generate(3000, seed=8, lead_swap=0.4)
    assert [(x.instruction, x.expressive) for x in a[:50]] == [
        (x.instruction, x.expressive) for x in generate(50, 8, lead_swap=0.4)
    ]
    hosts = [x for x in a if shapes.LEAD_SWAPS[x.edit]]
    swapped = sum(x.family >= len(FAMILIES[x.edit]) for x in hosts)
    assert abs(swapped - 0.4 * len(hosts)) <= 4.5 * math.sqrt(len(hosts) * 0.24)  # binomial
    for x in hosts:  # the template it was written from, filled, is the instruction's wording
        tmpl = shapes.templates(x.edit)[x.family]
        assert re.fullmatch(re.sub(r"\\\{\w+\\\}", "[a-z ]+", re.escape(tmpl)), x.instruction), (
            tmpl,
            x.instruction,
        )
    for bad in ({"lead_swap": 1.5}, {"lead_swap": -0.1}, {"lead_swap": 0.2, "split": "test"}):
        with pytest.raises(ValueError, match="lead_swap"):
            generate(5, seed=0, **bad)


def test_cli_lead_swap(tmp_path, capsys):
    out = tmp_path / "s"
    assert shapes.main(["--out", str(out), "--n", "40", "--lead-swap", "1", "--quiet"]) == 0
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert any(r["family"] >= len(FAMILIES[r["edit"]]) for r in rows)
    for argv in (["--lead-swap", "2"], ["--lead-swap", "0.3", "--split", "test"]):
        with pytest.raises(SystemExit) as e:
            shapes.main(["--out", str(tmp_path / "b"), "--n", "3", *argv])
        assert e.value.code != 0
        assert "lead" in capsys.readouterr().err
    assert not (tmp_path / "b" / "manifest.jsonl").exists()
