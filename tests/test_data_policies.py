"""Shard specs, length policies and caption choice: pure functions, checked against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from clapscale.config import AudioConfig
from clapscale.data.captions import EmptyCaptionError, choose_caption, tag_caption
from clapscale.data.policies import (
    apply_length_policy,
    frames_of,
    fusion_chunk_ranges,
    fusion_chunk_starts,
    repeat_pad,
)
from clapscale.data.specs import parse_spec

N = 480000


def test_brace_expansion_keeps_zero_padding_and_splits_sources():
    srcs = parse_spec("a/{000000..000002}.tar::b/{07..08}.tar", "0.7::0.3")
    assert srcs[0].urls == ("a/000000.tar", "a/000001.tar", "a/000002.tar")
    assert srcs[1].urls == ("b/07.tar", "b/08.tar")
    assert [s.weight for s in srcs] == [0.7, 0.3]
    assert [s.weight for s in parse_spec("a.tar::b.tar")] == [1.0, 1.0]


@pytest.mark.parametrize(
    "spec,weights,match",
    [("", "", "empty data spec"), ("a.tar::b.tar", "1", "2 source"), ("a.tar", "-1", "> 0"),
     ("a.tar::", "", "stray"), ("a.tar", "x", "numbers")],
)
def test_bad_specs_name_the_problem(spec, weights, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec, weights)


@pytest.mark.parametrize(
    "overrides,match",
    [(["data.train=a.tar::b.tar", "data.train_weights=0.5"], "1 weight"),
     (["data.train=a.tar", "data.train_weights=zero"], "not a number"),
     (["data.shuffle_buffer=-1"], "shuffle_buffer")],
)
def test_data_config_checked_at_load(overrides, match):
    from clapscale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_fusion_ranges_match_numpy_array_split():
    # transformers / LAION-CLAP: np.array_split(range(total - chunk + 1), 3), an empty third -> [0].
    # Hand-computed: total - 1001 + 1 candidate starts split into near-equal consecutive thirds.
    want = {
        1002: [(0, 0), (1, 1), (0, 0)],  # 2 starts: the back third is empty
        1003: [(0, 0), (1, 1), (2, 2)],
        1500: [(0, 166), (167, 333), (334, 499)],  # 500 = 167 + 167 + 166
        6001: [(0, 1666), (1667, 3333), (3334, 5000)],  # 5001 = 3 x 1667
    }
    for total, ranges in want.items():
        assert fusion_chunk_ranges(total, 1001) == ranges


def test_fusion_starts_eval_midpoints_train_within_thirds():
    ranges = fusion_chunk_ranges(2001, 1001)
    assert fusion_chunk_starts(2001, 1001, None) == tuple((lo + hi) // 2 for lo, hi in ranges)
    rng = np.random.default_rng(0)
    for _ in range(50):
        for s, (lo, hi) in zip(fusion_chunk_starts(2001, 1001, rng), ranges):
            assert lo <= s <= hi


@pytest.mark.parametrize("policy", ["rand_trunc", "repeatpad", "pad", "fusion"])
def test_short_clip_fill(policy):
    cfg = AudioConfig(length_policy=policy)
    wave = np.arange(1, 150001, dtype=np.float32)  # 150000 samples: 3 whole copies fit in N
    res = apply_length_policy(wave, cfg, rng=np.random.default_rng(0))
    assert res.waveform.shape == (N,) and res.length == 150000 and not res.is_longer
    if policy == "pad":
        np.testing.assert_array_equal(res.waveform[:150000], wave)
        assert not res.waveform[150000:].any()
    else:
        np.testing.assert_array_equal(res.waveform[:450000], np.tile(wave, 3))
        assert not res.waveform[450000:].any()


@pytest.mark.parametrize("policy", ["rand_trunc", "repeatpad", "pad"])
def test_long_clip_crop_random_in_training_first_window_in_eval(policy):
    cfg = AudioConfig(length_policy=policy)
    wave = np.arange(700000, dtype=np.float32)
    ev = apply_length_policy(wave, cfg, rng=None)
    np.testing.assert_array_equal(ev.waveform, wave[:N])
    assert ev.is_longer and ev.length == 700000
    offsets = set()
    for seed in range(5):
        tr = apply_length_policy(wave, cfg, rng=np.random.default_rng(seed))
        off = int(tr.waveform[0])
        np.testing.assert_array_equal(tr.waveform, wave[off : off + N])
        again = apply_length_policy(wave, cfg, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(again.waveform, tr.waveform)
        offsets.add(off)
    assert len(offsets) > 1


def test_fusion_long_clip_kept_whole_with_chunk_starts():
    cfg = AudioConfig(length_policy="fusion")
    wave = np.zeros(700000, dtype=np.float32)
    res = apply_length_policy(wave, cfg, rng=None)
    assert res.is_longer and res.waveform.shape == (700000,)
    assert res.fusion_starts == fusion_chunk_starts(frames_of(700000, 480), 1001, None)


def test_clip_just_over_ten_seconds_is_not_longer():
    # 480100 samples still give 1001 frames: transformers treats it as not longer; so do we.
    cfg = AudioConfig(length_policy="fusion")
    res = apply_length_policy(np.ones(480100, dtype=np.float32), cfg, rng=np.random.default_rng(0))
    assert not res.is_longer and res.waveform.shape == (N,)


def test_repeat_pad_and_zero_length():
    np.testing.assert_array_equal(repeat_pad(np.array([1, 2], np.float32), 5), [1, 2, 1, 2, 0])
    with pytest.raises(ValueError, match="zero-length"):
        apply_length_policy(np.zeros(0, np.float32), AudioConfig(), rng=None)


def test_captions():
    meta = {"text": ["a dog barks", "barking"], "tag": ["dog", "bark_loud", "rain"],
            "text_augment_t5": ["k2c one", "k2c two"]}
    assert tag_caption(["dog"]) == "The sound of dog"
    assert choose_caption(meta, "tag_template", None) == "The sound of dog, bark loud and rain"
    assert choose_caption(meta, "text", None) == "a dog barks"
    assert choose_caption(meta, "text_augment_t5", None) == "k2c one"
    # A source without the K2C key falls back to its own captions.
    assert choose_caption({"text": ["x"]}, "text_augment_all", None) == "x"
    drawn = {choose_caption(meta, "text", np.random.default_rng(s)) for s in range(20)}
    assert drawn == {"a dog barks", "barking"}
    with pytest.raises(EmptyCaptionError):
        choose_caption({"text": ["  "]}, "text", None)


def test_text_or_tags_draws_captions_and_the_tag_template():
    meta = {"text": ["swordman die"], "tag": ["scream"]}
    drawn = [choose_caption(meta, "text_or_tags", np.random.default_rng(s)) for s in range(200)]
    assert set(drawn) == {"swordman die", "The sound of scream"}
    assert 60 < drawn.count("swordman die") < 140  # uniform over the two
    # Evaluation (no generator) keeps the first caption; untagged samples draw from text only.
    assert choose_caption(meta, "text_or_tags", None) == "swordman die"
    assert {choose_caption({"text": ["a", "b"]}, "text_or_tags", np.random.default_rng(s)) for s in range(20)} == {"a", "b"}


def test_config_accepts_every_caption_mode():
    from clapscale.config import Config
    from clapscale.data.captions import CAPTION_MODES
    for mode in CAPTION_MODES:
        Config().data.__class__(caption=mode).validate("data")
    with pytest.raises(ValueError, match="caption"):
        Config().data.__class__(caption="nope").validate("data")
