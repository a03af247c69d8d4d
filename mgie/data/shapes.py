"""A world we can check exactly: procedurally rendered edits of simple shapes.

``python -m mgie.data.shapes --out DIR --n N --seed S [--split SPLIT]`` writes ``DIR/manifest.jsonl``
(our JSONL manifest, ``data.dataset: shapes``) and the PNGs, deterministically for (seed, split);
the ``train`` split also writes ``DIR/tokenizer/``, a SentencePiece tokenizer of the world's text.

Scenes are 64 x 64 px: up to four objects (square, circle, triangle, diamond; six colours;
three sizes) in the cells of a 2 x 2 grid, on a plain, striped or checked background, drawn
without anti-aliasing so every pixel of a target is exact. 64 px keeps the smallest object
(10 px) several latent cells wide at the VAE's factor 2 while costing a quarter of 128 px.

Each example: source, target, a terse ``instruction`` from a template family, the concise
``expressive`` instruction that spells the operation out, its ``kind`` (local, global,
ambiguous) and ``edit``. The target follows from the source and the instruction alone (an added
object sits at the centre of the named cell; a resize is one step, its instruction names the
direction or the size the object ends with). Paraphrase families marked held out (new
combinations of words the training text has), and the (edit, shape) combinations in
``HELDOUT_COMBOS``, never occur in the ``train``/``test`` splits; ``heldout_paraphrase`` and
``heldout_combo`` contain only them. ``--lead-swap P`` words that share of the train split's
examples by a lead-verb swap of a seen template (``LEAD_SWAPS``; never within a word of a held-out
one). The tokenizer is the same for every data set written (:func:`world_tokenizer`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

SIZE = 64
CELL = SIZE // 2
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}  # fmt: skip
BACKGROUNDS = {
    "white": (245, 245, 245), "gray": (190, 190, 190), "beige": (235, 220, 190),
    "light blue": (185, 215, 240), "pink": (245, 200, 215), "navy": (30, 40, 90),
}  # fmt: skip
SHAPES = ("square", "circle", "triangle", "diamond")
SIDES = {"small": 10, "medium": 16, "large": 24}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
TEXTURES = ("plain", "stripes", "checker")
SPLITS = ("train", "test", "heldout_paraphrase", "heldout_combo", "caption")
HELDOUT_COMBOS = {("recolour", "diamond"), ("remove", "triangle"), ("move", "circle")}


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """One object: what it is and where (cell of the 2 x 2 grid, jitter in px)."""

    shape: str
    color: str
    size: str
    cell: int
    dx: int = 0
    dy: int = 0

    @property
    def name(self) -> str:
        """``'<colour> <shape>'``, as instructions name the object."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Background, objects, and global operations applied after drawing, in order."""

    background: str
    texture: str
    objects: tuple[Obj, ...]
    ops: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    s = SIDES[o.size]
    cx, cy = (o.cell % 2) * CELL + CELL // 2 + o.dx, (o.cell // 2) * CELL + CELL // 2 + o.dy
    x0, y0, x1, y1 = cx - s // 2, cy - s // 2, cx - s // 2 + s - 1, cy - s // 2 + s - 1
    fill = COLORS[o.color]
    if o.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _background(name: str, texture: str) -> np.ndarray:
    base = np.array(BACKGROUNDS[name], dtype=np.float64)
    img = np.tile(base, (SIZE, SIZE, 1))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if texture == "stripes":
        img[(yy // 4) % 2 == 1] *= 0.85
    elif texture == "checker":
        img[((yy // 8) + (xx // 8)) % 2 == 1] *= 0.85
    return np.round(img).astype(np.uint8)


def apply_op(img: np.ndarray, op: str, arg: str) -> np.ndarray:
    """A global operation on a uint8 (H, W, 3) image, exactly (float64, then rounded)."""
    x = img.astype(np.float64)
    if op == "brightness":
        x = x * {"up": 1.35, "down": 0.65}[arg]
    elif op == "contrast":
        x = (x - 128.0) * {"up": 1.6, "down": 0.5}[arg] + 128.0
    elif op == "grayscale":
        x = np.repeat((x @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=-1)
    elif op == "invert":
        x = 255.0 - x
    elif op == "tint":
        x = 0.65 * x + 0.35 * np.array(COLORS[arg], dtype=np.float64)
    else:
        raise ValueError(f"unknown operation {op!r}")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    """The scene as an exact RGB image."""
    img = Image.fromarray(_background(scene.background, scene.texture))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_obj(draw, o)
    arr = np.asarray(img)
    for op, arg in scene.ops:
        arr = apply_op(arr, op, arg)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- templates

# Each edit: paraphrase families (the last one is held out) and the expressive template. A model
# trained from scratch on this world cannot know what a word it has never seen means, so every
# held-out family is a new *combination* of words that occur elsewhere in the training text (a
# test of compositional generalisation): "take away" (seen: "take away the biggest thing") with
# an object name, "paint a" with a shape, "put the" with an existing object, and so on.
FAMILIES = {
    "recolour": ["make the {name} {new}", "change the {name} to {new}", "paint the {name} {new}",
                 "turn the {name} {new}"],
    "remove": ["remove the {name}", "delete the {name}", "get rid of the {name}", "take away the {name}"],
    "add": ["add a {new} {shape} in the {corner}", "put a {new} {shape} in the {corner}",
            "draw a {new} {shape} in the {corner}", "paint a {new} {shape} in the {corner}"],
    "move": ["move the {name} to the {corner}", "shift the {name} to the {corner}",
             "drag the {name} to the {corner}", "put the {name} in the {corner}"],
    "resize": ["make the {name} {bigger}", "{enlarge} the {name}", "change the size of the {name} to {adj}",
               "give the {name} a {adj} size"],
    "brightness": ["make it {brighter}", "{brighten} the image", "{increase} the brightness"],
    "contrast": ["{increase} the contrast", "make it {more} contrasty", "give it {more} contrast"],
    "grayscale": ["make it black and white", "remove the colours", "make it grayscale"],
    "invert": ["invert the colours", "make it a negative", "make a negative of it"],
    "tint": ["give it a {new} tint", "tint it {new}", "add a {new} cast", "add a {new} tint"],
    "background": ["change the background to {bg}", "make the background {bg}", "paint the background {bg}"],
    "odd_one_out": ["make the odd one out {new}", "colour the odd one out {new}", "recolour the odd one out {new}",
                    "paint the odd one out {new}"],
    "biggest": ["remove the biggest shape", "delete the largest object", "take away the biggest thing",
                "get rid of the largest shape"],
    "smallest": ["make the smallest shape {new}", "colour the smallest object {new}", "paint the tiniest shape {new}",
                 "change the smallest object to {new}"],
    "sea": ["paint it like the sea", "make it look like the ocean", "make it feel like the seaside",
            "make it look like the sea"],
    "night": ["make it look like night", "turn the day into night", "make it night time", "make it feel like night"],
}  # fmt: skip
# Lead-verb swaps (``--lead-swap P``, train split only; beyond the paper). In the families above a
# few verbs that name no operation ("make", "give", "put", ...) each open the seen templates of one
# or a few edits, so a model learns the verb as the edit ("give it ..." = tint, "put ..." = add) and
# misreads a new wording that opens with it ("give it more contrast"). A derived template is a seen
# template with its neutral lead verb swapped for another neutral one ("give it more contrasty",
# "put the odd one out {new}"); it is dropped when it is a template of the families, collides with
# another edit's derived one, or is within one word (fields counted as words) of a held-out
# template, so that no held-out wording, nor a near copy of one, is ever trained on.
NEUTRAL_LEADS = ("make", "change", "paint", "put", "give", "turn")


def word_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two word sequences (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _lead_swaps() -> dict[str, list[str]]:
    """Each edit's derived templates (see ``NEUTRAL_LEADS``), in a fixed order."""
    heldout = [fams[-1].split() for fams in FAMILIES.values()]
    seen = {t for fams in FAMILIES.values() for t in fams}
    derived: dict[str, list[str]] = {}
    for edit, fams in FAMILIES.items():
        out = derived[edit] = []
        for tmpl in fams[:-1]:
            lead, *rest = tmpl.split()
            if lead not in NEUTRAL_LEADS:
                continue
            for verb in NEUTRAL_LEADS:
                cand = " ".join([verb, *rest])
                far = min(word_distance(cand.split(), h) for h in heldout) >= 2
                if far and cand not in seen and cand not in out:
                    out.append(cand)
    counts = Counter(t for ts in derived.values() for t in ts)  # a swap two edits share says neither
    return {edit: [t for t in ts if counts[t] == 1] for edit, ts in derived.items()}


LEAD_SWAPS = _lead_swaps()


def templates(edit: str) -> list[str]:
    """``edit``'s templates by family index: its families (the last held out), then its lead-verb swaps."""
    return FAMILIES[edit] + LEAD_SWAPS[edit]


KINDS = {
    "local": ("recolour", "remove", "add", "move", "resize"),
    "global": ("brightness", "contrast", "grayscale", "invert", "tint", "background"),
    "ambiguous": ("odd_one_out", "biggest", "smallest", "sea", "night"),
}
KIND_OF = {e: k for k, edits in KINDS.items() for e in edits} | {"describe": "caption"}
# The caption split: no edit (target = source), the expressive text names every object. It is the
# world's image-text pre-training data, the role LLaVA's caption pre-training plays for MGIE.
CAPTION_FAMILIES = ["describe the image", "what is in the image", "describe the picture"]
TEXTURE_WORDS = {"plain": "plain", "stripes": "striped", "checker": "checked"}
WORDS = {  # direction-dependent words of the templates
    "up": {"bigger": "bigger", "enlarge": "enlarge", "brighter": "brighter",
           "brighten": "brighten", "increase": "increase", "more": "more"},
    "down": {"bigger": "smaller", "enlarge": "shrink", "brighter": "darker",
             "brighten": "darken", "increase": "decrease", "more": "less"},
}  # fmt: skip


@dataclass
class Example:
    """One generated edit, before its images are written."""

    source: Scene
    target: Scene
    instruction: str
    expressive: str
    edit: str
    family: int
    target_shape: str | None = None


# ----------------------------------------------------------------------------- edits


def _random_scene(rng: random.Random, n_min: int = 1, n_max: int = 4) -> Scene:
    cells = rng.sample(range(4), rng.randint(n_min, n_max))
    objs = tuple(_random_obj(rng, c) for c in sorted(cells))
    bg = rng.choice([b for b in BACKGROUNDS if b != "navy"])
    return Scene(bg, rng.choice(TEXTURES), objs)


def _random_obj(rng: random.Random, cell: int, **fixed) -> Obj:
    size = fixed.get("size") or rng.choice(list(SIDES))
    slack = (CELL - SIDES[size]) // 2 - 1
    return Obj(
        shape=fixed.get("shape") or rng.choice(SHAPES), color=fixed.get("color") or rng.choice(list(COLORS)),
        size=size, cell=cell, dx=rng.randint(-slack, slack), dy=rng.randint(-slack, slack),
    )  # fmt: skip


def _unique(scene: Scene) -> list[Obj]:
    """Objects that colour + shape name unambiguously."""
    names = [o.name for o in scene.objects]
    return [o for o in scene.objects if names.count(o.name) == 1]


def _swap(scene: Scene, old: Obj, new: Obj | None) -> Scene:
    objs = tuple(o for o in scene.objects if o != old) + ((new,) if new else ())
    return replace(scene, objects=tuple(sorted(objs, key=lambda o: o.cell)))


def _fill(template: str, **kw) -> str:
    return template.format(**kw)


def _recoloured(src: Scene, o: Obj, new: str, instruction: str, edit: str, family: int) -> Example:
    return Example(src, _swap(src, o, replace(o, color=new)), instruction,
                   f"change the colour of the {o.size} {o.name} to {new}", edit, family, o.shape)  # fmt: skip


def _removed(src: Scene, o: Obj, instruction: str, edit: str, family: int) -> Example:
    return Example(src, _swap(src, o, None), instruction, f"remove the {o.size} {o.name} and show the background",
                   edit, family, o.shape)  # fmt: skip


def make_edit(rng: random.Random, edit: str, family: int) -> Example | None:
    """One example of ``edit`` with template ``family`` (:func:`templates`); None if this scene cannot host it."""
    tmpl = templates(edit)[family]
    d = rng.choice(("up", "down"))
    w = WORDS[d]
    if edit in ("recolour", "remove", "move", "resize"):
        src = _random_scene(rng)
        cands = _unique(src)
        if not cands:
            return None
        o = rng.choice(cands)
        if edit == "recolour":
            new = rng.choice([c for c in COLORS if c != o.color])
            return _recoloured(src, o, new, _fill(tmpl, name=o.name, new=new), edit, family)
        if edit == "remove":
            return _removed(src, o, _fill(tmpl, name=o.name), edit, family)
        if edit == "move":
            free = [c for c in range(4) if c not in {x.cell for x in src.objects}]
            if not free:
                return None
            c = rng.choice(free)
            return Example(
                src,
                _swap(src, o, replace(o, cell=c)),
                _fill(tmpl, name=o.name, corner=CORNERS[c]),
                f"move the {o.size} {o.name} to the {CORNERS[c]} corner",
                edit,
                family,
                o.shape,
            )
        order = list(SIDES)
        i = order.index(o.size) + (1 if d == "up" else -1)
        if not 0 <= i < len(order):
            return None
        centred = replace(o, dx=0, dy=0)  # so that the size is the only change
        src, tgt = _swap(src, o, centred), _swap(src, o, replace(centred, size=order[i]))
        # "{adj}" names the size the object ends with ("change the size of it to medium"); "bigger",
        # "shrink" ... name the direction of the one step
        return Example(
            src, tgt, _fill(tmpl, name=o.name, adj=order[i], **w), f"make the {o.name} {order[i]}",
            edit, family, o.shape,
        )  # fmt: skip
    if edit == "add":
        src = _random_scene(rng, 0, 3)
        free = [c for c in range(4) if c not in {x.cell for x in src.objects}]
        c = rng.choice(free)
        o = replace(
            _random_obj(rng, c, size="medium"), dx=0, dy=0
        )  # centred: the instruction fixes the place
        if o.name in [x.name for x in src.objects]:
            return None
        return Example(
            src,
            _swap(src, None, o),
            _fill(tmpl, new=o.color, shape=o.shape, corner=CORNERS[c]),
            f"add a medium {o.name} in the {CORNERS[c]} corner",
            edit,
            family,
            o.shape,
        )
    if edit in KINDS["global"]:
        src = _random_scene(rng)
        if edit == "background":
            bg = rng.choice([b for b in BACKGROUNDS if b != src.background])
            return Example(
                src,
                replace(src, background=bg),
                _fill(tmpl, bg=bg),
                f"change the background colour to {bg}",
                edit,
                family,
            )
        arg = {"brightness": d, "contrast": d, "tint": rng.choice(list(COLORS))}.get(edit, "")
        expressive = {
            "brightness": f"{w['increase']} the brightness of the whole image",
            "contrast": f"{w['increase']} the contrast of the whole image",
            "grayscale": "turn the whole image grayscale", "invert": "invert all the colours of the image",
            "tint": f"tint the whole image {arg}",
        }[edit]  # fmt: skip
        return Example(
            src, replace(src, ops=((edit, arg),)), _fill(tmpl, new=arg, **w), expressive, edit, family
        )
    return _ambiguous(rng, edit, tmpl, family)


def caption(scene: Scene) -> str:
    """The scene in words: each object (size, colour, shape, corner) in cell order, then the background."""
    objects = [f"a {o.size} {o.name} in the {CORNERS[o.cell]}" for o in scene.objects]
    return ", ".join([*objects, f"on a {TEXTURE_WORDS[scene.texture]} {scene.background} background"])


def _described(rng: random.Random) -> Example:
    src = _random_scene(rng)
    family = rng.randrange(len(CAPTION_FAMILIES))
    return Example(src, src, CAPTION_FAMILIES[family], caption(src), "describe", family)


def _ambiguous(rng: random.Random, edit: str, tmpl: str, family: int) -> Example | None:
    if edit == "odd_one_out":  # all share a shape (or a colour) but one
        cells = sorted(rng.sample(range(4), rng.randint(3, 4)))
        shape, odd_shape = rng.sample(SHAPES, 2)
        colors = rng.sample(list(COLORS), len(cells))
        objs = [_random_obj(rng, c, shape=shape, color=col) for c, col in zip(cells, colors)]
        k = rng.randrange(len(objs))
        objs[k] = replace(objs[k], shape=odd_shape)
        src = Scene(rng.choice(["white", "gray", "beige"]), "plain", tuple(objs))
        o = objs[k]
        new = rng.choice([c for c in COLORS if c not in colors])
        return _recoloured(src, o, new, _fill(tmpl, new=new), edit, family)
    if edit in ("biggest", "smallest"):
        src = _random_scene(rng, 2, 4)
        sizes = sorted(SIDES[o.size] for o in src.objects)
        pick = max if edit == "biggest" else min
        o = pick(src.objects, key=lambda x: SIDES[x.size])
        if sizes.count(SIDES[o.size]) != 1:
            return None
        if edit == "biggest":
            return _removed(src, o, tmpl, edit, family)
        new = rng.choice([c for c in COLORS if c != o.color])
        return _recoloured(src, o, new, _fill(tmpl, new=new), edit, family)
    src = _random_scene(rng)
    if edit == "sea":
        tgt = replace(src, background="light blue", ops=(("tint", "blue"),))
        return Example(
            src,
            tgt,
            tmpl,
            "change the background colour to light blue and tint the whole image blue",
            edit,
            family,
        )
    tgt = replace(src, background="navy", ops=(("brightness", "down"),))  # night
    return Example(
        src, tgt, tmpl, "change the background colour to navy and decrease the brightness", edit, family
    )


# ----------------------------------------------------------------------------- generation


def allowed(split: str, edit: str, family: int, shape: str | None) -> bool:
    """Whether an example belongs to ``split`` (held-out families and combinations)."""
    heldout_family = family == len(FAMILIES[edit]) - 1
    heldout_combo = (edit, shape) in HELDOUT_COMBOS
    if split in ("train", "test"):
        return not heldout_family and not heldout_combo
    if split == "heldout_paraphrase":
        return heldout_family and not heldout_combo
    return heldout_combo and not heldout_family


def _split_edits(split: str) -> dict[str, list[str]]:
    """The edits ``split`` draws from, per kind (``heldout_combo``: the held-out combinations' local edits)."""
    if split == "heldout_combo":
        return {"local": [e for e in KINDS["local"] if e in {c[0] for c in HELDOUT_COMBOS}]}
    return {kind: list(edits) for kind, edits in KINDS.items()}


def edit_shares(weights: dict[str, float] | None = None, split: str = "train") -> dict[str, float]:
    """Each edit's share of the examples of ``split``: by default a third per kind, split evenly
    over the kind's edits; ``weights`` multiplies the shares of the edits it names (then they
    are renormalised), e.g. ``{"add": 3}`` makes adds three times as frequent as by default."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown edit(s) {unknown} in the edit weights; known: {sorted(FAMILIES)}")
    if any(not (0 <= w < float("inf")) for w in weights.values()):
        raise ValueError(f"edit weights must be finite and >= 0, got {weights}")
    kinds = _split_edits(split)
    base = {e: 1 / (len(kinds) * len(edits)) for edits in kinds.values() for e in edits}
    raw = {e: s * weights.get(e, 1.0) for e, s in base.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("the edit weights leave no edit to generate")
    return {e: v / total for e, v in raw.items()}


def generate(
    n: int, seed: int, split: str = "train", weights: dict[str, float] | None = None, lead_swap: float = 0.0
) -> list[Example]:
    """``n`` examples of ``split``, a third of each kind (``heldout_combo``: local edits only;
    ``caption``: captions only), deterministic for (seed, split, weights, lead_swap). With ``weights``
    (see :func:`edit_shares`) each example's edit is drawn from the reweighted shares instead. With
    ``lead_swap`` (train split only) an example of an edit that has lead-verb swaps takes one of
    them (``LEAD_SWAPS``) instead of its family with that probability."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if not 0 <= lead_swap <= 1 or (lead_swap and split != "train"):
        raise ValueError(
            f"lead_swap must be in [0, 1] and is for the train split only, got {lead_swap} for {split}"
        )
    rng = random.Random(f"{seed}-{split}")

    def draw_family(edit: str) -> int:
        if not (lead_swap and LEAD_SWAPS[edit]):  # the draw of every data set written before
            return rng.randrange(len(FAMILIES[edit]))
        if rng.random() < lead_swap:
            return len(FAMILIES[edit]) + rng.randrange(len(LEAD_SWAPS[edit]))
        # else a seen family (train split), so that the share of swaps is exactly lead_swap
        return rng.randrange(len(FAMILIES[edit]) - 1)

    if split == "caption":
        return [_described(rng) for _ in range(n)]
    kinds = list(_split_edits(split).items())
    shares = edit_shares(weights, split) if weights else None
    out: list[Example] = []
    while len(out) < n:
        if shares:  # the edit is kept until a scene hosts it, so that the shares hold exactly in expectation
            edit = rng.choices(list(shares), weights=list(shares.values()))[0]
            while True:
                family = draw_family(edit)
                ex = make_edit(rng, edit, family)
                if ex is not None and allowed(split, edit, family, ex.target_shape):
                    break
            out.append(ex)
            continue
        # the default mix, kept draw for draw so that every data set written before is reproduced
        edit = rng.choice(kinds[len(out) % len(kinds)][1])
        family = draw_family(edit)
        ex = make_edit(rng, edit, family)
        if ex is not None and allowed(split, edit, family, ex.target_shape):
            out.append(ex)
    return out


def write(examples: list[Example], out: Path, split: str, progress: bool = True) -> Path:
    """Render and write the PNGs and ``manifest.jsonl``; returns the manifest path."""
    from mgie.data.formats import write_jsonl

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(tqdm(examples, desc=f"shapes {split}", disable=not progress)):
        name = f"{split}_{i:06d}"
        render(ex.source).save(out / "images" / f"{name}_src.png")
        render(ex.target).save(out / "images" / f"{name}_tgt.png")
        rows.append({
            "id": name, "source": f"images/{name}_src.png", "target": f"images/{name}_tgt.png",
            "instruction": ex.instruction, "expressive": ex.expressive, "kind": KIND_OF[ex.edit],
            "edit": ex.edit, "family": ex.family, "split": split,
            "scene": asdict(ex.source), "target_scene": asdict(ex.target),
        })  # fmt: skip
    manifest = out / "manifest.jsonl"
    write_jsonl(rows, manifest)
    return manifest


TOKENIZER_EXAMPLES = 20_000


def world_tokenizer(vocab_size: int = 768, num_img_tokens: int = 8):
    """The world's SentencePiece tokenizer, the same for every data set written: trained on the
    texts of a fixed sample of the train and caption splits as the model reads them, each instruction inside
    the prompt (where the quote is glued to its first word) and each expressive text. 768 pieces
    (256 of them byte fallback) keep every word whole."""
    from mgie.tokens import train_tokenizer

    examples = generate(TOKENIZER_EXAMPLES, 0, "train") + generate(TOKENIZER_EXAMPLES // 4, 0, "caption")
    lines = [f"USER: what will this image be like if '{e.instruction}' ASSISTANT:" for e in examples]
    lines += [e.expressive for e in examples]
    return train_tokenizer(lines, vocab_size, num_img_tokens)


def edit_weights(text: str) -> dict[str, float]:
    """Parse ``EDIT=W,EDIT=W`` (the ``--edit-weights`` option) into a dict, checked by :func:`edit_shares`."""
    import argparse

    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected EDIT=WEIGHT, got {item!r}") from None
    try:
        edit_shares(out)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m mgie.data.shapes --out DIR --n N --seed S [--split SPLIT]``."""
    from mgie.cli import Parser, ranged, run_command

    p = Parser(prog="python -m mgie.data.shapes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (manifest.jsonl + images/)")
    p.add_argument("--n", type=ranged(int, 1, 10_000_000), required=True, help="number of examples")
    p.add_argument("--seed", type=ranged(int, 0, 2**31), default=0)
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument(
        "--edit-weights", type=edit_weights, metavar="EDIT=W,...",
        help="multiply the default share of these edits, e.g. add=3,move=3 (train a model on its weak edits)",
    )  # fmt: skip
    p.add_argument(
        "--lead-swap", type=ranged(float, 0, 1), default=0.0, metavar="P",
        help="train split: the share of examples worded by a lead-verb swap of a seen template (default 0)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.lead_swap and args.split != "train":
        p.error(f"--lead-swap is for the train split only (got --split {args.split})")

    def run() -> int:
        out = Path(args.out)
        if (out / "manifest.jsonl").exists():
            raise ValueError(f"{out / 'manifest.jsonl'} exists; choose another --out")
        examples = generate(args.n, args.seed, args.split, args.edit_weights, args.lead_swap)
        if args.edit_weights:
            shares = edit_shares(args.edit_weights, args.split)
            print("edit shares: " + ", ".join(f"{e} {v:.3f}" for e, v in shares.items()))
        manifest = write(examples, out, args.split, not args.quiet)
        print(f"wrote {args.n} examples to {manifest}")
        if args.split in ("train", "caption"):
            world_tokenizer().save_pretrained(out / "tokenizer")
            print(f"wrote the world's tokenizer to {out / 'tokenizer'}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
