"""Training-time rewording of the instructions (``data.explicit_instructions``, ``data.wording_dropout``)."""

import random
from collections import Counter

import pytest

from mgie.config import ConfigError, load_config
from mgie.data.dataset import EditDataset, reword
from mgie.data.records import EditRecord, FileImage

EXPRESSIVE = "turn the whole image grayscale"


def test_nothing_changes_at_zero():
    rng = random.Random(0)
    assert all(reword("make it black and white", EXPRESSIVE, rng, 0.0, 0.0) == "make it black and white"
               for _ in range(50))  # fmt: skip


def test_explicit_share_and_dropout_rate_match_their_settings():
    """2,000 draws: the explicit share is 0.2, and each wording word goes with probability 0.3
    (binomial standard errors 0.009 and 0.005); content words are never dropped."""
    rng = random.Random(1)
    outs = [reword("make the red square blue", "change the colour of the red square to blue", rng, 0.2, 0.3)
            for _ in range(2000)]  # fmt: skip
    explicit = sum(o == "change the colour of the red square to blue" for o in outs)
    assert abs(explicit / 2000 - 0.2) < 0.04
    rest = [o for o in outs if not o.startswith("change")]
    assert all(o.endswith("the red square blue") for o in rest)  # only "make" is wording here
    assert abs(sum(o == "the red square blue" for o in rest) / len(rest) - 0.3) < 0.04


def test_a_wording_only_instruction_keeps_a_word_and_words_keep_their_order():
    rng = random.Random(2)
    outs = [reword("make it black and white", EXPRESSIVE, rng, 0.0, 1.0) for _ in range(200)]
    assert all(len(o.split()) == 1 and o in "make it black and white".split() for o in outs)
    outs = [reword("make it black and white", EXPRESSIVE, rng, 0.0, 0.5) for _ in range(500)]
    words = "make it black and white".split()
    for o in outs:
        idx = [words.index(w) for w in o.split()]
        assert idx == sorted(idx) and o  # a subsequence, never empty
    assert len(Counter(outs)) > 10  # many wordings


def _dataset(cfg, n=40):
    recs = [EditRecord(str(i), FileImage(None), FileImage(None), "make it black and white", EXPRESSIVE)
            for i in range(n)]  # fmt: skip
    recs.append(EditRecord("x", FileImage(None), FileImage(None), "make it dark", None))
    return EditDataset(recs, None, None, cfg, captions=[
        EditRecord("c", FileImage(None), FileImage(None), "describe the image", "a red square")])  # fmt: skip


def test_dataset_rewords_edit_rows_only_and_the_same_way_every_time():
    cfg = load_config(
        overrides=["data.explicit_instructions=0.3", "data.wording_dropout=0.5", "train.seed=4"]
    )
    ds = _dataset(cfg)
    first = [ds.instruction(i) for i in range(len(ds))]
    assert (
        first
        == [ds.instruction(i) for i in range(len(ds))]
        == [_dataset(cfg).instruction(i) for i in range(42)]
    )
    assert first[-2:] == ["make it dark", "describe the image"]  # no expressive text; a caption
    assert EXPRESSIVE in first[:40] and any(o != EXPRESSIVE and o != "make it black and white" for o in first)
    cfg.train.seed = 5
    assert [_dataset(cfg).instruction(i) for i in range(40)] != first[:40]  # the seed draws them
    plain = _dataset(load_config())
    assert [plain.instruction(i) for i in range(42)] == ["make it black and white"] * 40 + [
        "make it dark",
        "describe the image",
    ]


@pytest.mark.parametrize("key", ["explicit_instructions", "wording_dropout"])
def test_settings_out_of_range_are_refused(key):
    with pytest.raises(ConfigError, match=f"data.{key} must be in"):
        load_config(overrides=[f"data.{key}=1.5"])
