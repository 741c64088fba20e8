"""--preset audioset on an AudioSet-layout folder made here: the official CSVs (with their '#' header
lines, spaces after commas and quoted label lists), the label index, and a few real audio files named
the ways download scripts name them."""

from __future__ import annotations

import json

from clapscale.shards.cli import main as make_shards
from clapscale.shards.sources import read_audioset_segments
from clapscale.shards.verify import verify_shards
from tests.test_shards_presets import _metas, _wav

LABELS = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/05zppz,"Male speech, man speaking"
2,/m/0bt9lr,"Dog"
3,/m/04rlf,"Music"
4,/m/06mb1,"Rain"
"""


def _segments(rows):
    head = ("# Segments csv created Sun Mar  5 10:54:31 2017\n"
            f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels=5, num_positive_labels=9\n"
            "# YTID, start_seconds, end_seconds, positive_labels\n")
    return head + "".join(f'{y}, {s}, {e}, "{labels}"\n' for y, s, e, labels in rows)


def _audioset(tmp_path):
    root = tmp_path / "audioset"
    root.mkdir()
    (root / "class_labels_indices.csv").write_text(LABELS)
    (root / "balanced_train_segments.csv").write_text(_segments([
        ("--PJHxphWEs", "30.000", "40.000", "/m/09x0r,/m/05zppz"),  # file: Y--PJHxphWEs_30.000_40.000.wav
        ("a_dog-barks", "0.000", "10.000", "/m/0bt9lr,/m/04rlf"),   # file: a_dog-barks.flac
        ("neverfetchd", "10.000", "20.000", "/m/06mb1"),            # no file: missing_file
    ]))
    (root / "unbalanced_train_segments.csv").write_text(_segments([
        ("justmusic00", "5.000", "15.000", "/m/04rlf"),             # only a dropped label
        ("inaudiocaps", "20.000", "30.000", "/m/06mb1,/m/0bt9lr"),  # excluded by id
    ]))
    (root / "eval_segments.csv").write_text(_segments([("rainyday_01", "1.500", "11.500", "/m/06mb1")]))
    _wav(root / "balanced" / "Y--PJHxphWEs_30.000_40.000.wav", 300)
    _wav(root / "balanced" / "a_dog-barks.flac", 500)
    _wav(root / "unbalanced" / "part01" / "Yjustmusic00_5_15.wav", 600)
    _wav(root / "unbalanced" / "part01" / "inaudiocaps_20.wav", 700)
    _wav(root / "eval" / "rainyday_01_1500_11500.wav", 800)
    return root


def test_segment_csv_reading(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(_segments([("-x_y", "0.000", "10.000", "/m/a,/t/dd00088")]))
    assert read_audioset_segments(path) == [("-x_y", "0.000", "10.000", ["/m/a", "/t/dd00088"])]


def test_audioset_preset_tags_captions_metadata_and_rejects(tmp_path):
    root = _audioset(tmp_path)
    (tmp_path / "audiocaps_test.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                                 "7,inaudiocaps,20,rain and a dog\n")
    out = tmp_path / "out"
    assert make_shards(["--preset", "audioset", str(root), "--out", str(out), "--quiet",
                        "--drop-mids", "/m/04rlf", "--exclude-ytids", str(tmp_path / "audiocaps_test.csv")]) == 0
    assert verify_shards(out).ok
    metas = _metas(out)
    assert sorted(metas) == ["youtube:--PJHxphWEs@30.000", "youtube:a_dog-barks@0.000", "youtube:rainyday_01@1.500"]
    speech = metas["youtube:--PJHxphWEs@30.000"]
    assert speech["tag"] == ["Speech", "Male speech, man speaking"]
    assert speech["text"] == ["The sound of Speech and Male speech, man speaking"]
    assert (speech["youtube_id"], speech["start"], speech["end"]) == ("--PJHxphWEs", 30.0, 40.0)
    assert speech["mids"] == ["/m/09x0r", "/m/05zppz"] and speech["split"] == "train"
    assert speech["audioset_part"] == "balanced_train" and speech["source"] == "audioset"
    dog = metas["youtube:a_dog-barks@0.000"]
    assert dog["tag"] == ["Dog"] and dog["mids"] == ["/m/0bt9lr"]  # Music dropped
    assert metas["youtube:rainyday_01@1.500"]["split"] == "eval"
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert {k: v["samples"] for k, v in splits.items()} == {"train": 2, "eval": 1}
    rejects = {r["path"]: r["code"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {"youtube:neverfetchd@10.000": "missing_file", "youtube:justmusic00@5.000": "all_labels_dropped",
                       "youtube:inaudiocaps@20.000": "excluded_ytid"}


def test_audioset_without_options_keeps_every_downloaded_clip(tmp_path):
    root = _audioset(tmp_path)
    out = tmp_path / "out"
    assert make_shards(["--preset", "audioset", str(root), "--out", str(out), "--quiet"]) == 0
    metas = _metas(out)
    assert len(metas) == 5
    assert metas["youtube:a_dog-barks@0.000"]["text"] == ["The sound of Dog and Music"]
    assert metas["youtube:justmusic00@5.000"]["tag"] == ["Music"]
    rejects = [json.loads(x)["code"] for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == ["missing_file"]


def test_audioset_bad_options_are_one_line_errors(tmp_path, capsys):
    root = _audioset(tmp_path)
    assert make_shards(["--preset", "audioset", str(root), "--out", str(tmp_path / "o"), "--quiet",
                        "--drop-mids", "/m/nope"]) == 2
    assert "/m/nope" in capsys.readouterr().err
    assert make_shards(["--preset", "audioset", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "class_labels_indices.csv" in capsys.readouterr().err
    assert make_shards(["--from-dir", str(root), "--out", str(tmp_path / "o"), "--quiet", "--drop-mids", "/m/09x0r"]) == 2
    assert "--preset audioset" in capsys.readouterr().err
    # A re-distributed copy with a plain header line reads; a non-numeric start is one line, not a traceback.
    (root / "eval_segments.csv").write_text("YTID,start_seconds,end_seconds,positive_labels\n"
                                            'rainyday_01,1.500,11.500,"/m/06mb1"\n')
    assert read_audioset_segments(root / "eval_segments.csv") == [("rainyday_01", "1.500", "11.500", ["/m/06mb1"])]
    (root / "eval_segments.csv").write_text('rainyday_01, start, 11.500, "/m/06mb1"\n')
    assert make_shards(["--preset", "audioset", str(root), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "eval_segments.csv:1: start/end seconds are not numbers" in err and "Traceback" not in err
