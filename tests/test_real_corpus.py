"""The real-audio corpus builder: path captions, the keyword labeller, and the whole tool on real .debs.

The packages here are small real Debian packages built with ``dpkg-deb -b`` into the tool's cache
(so nothing is downloaded), named like allowed training packages; the shards come from the real
make_shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from clapscale.shards.debian import find_sounds, unpack_archives
from clapscale.shards.pathtext import clean_caption, keyword_label, path_words
from clapscale.shards.realcorpus import main as real_corpus, split_of

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")


def test_path_words_split_camel_case_separators_and_digits():
    assert path_words("Data/Sounds/voices/Default_uk/TakeCover2.ogg") == [
        "data", "sounds", "voices", "default", "uk", "take", "cover", "ogg"]


@pytest.mark.parametrize("path, drop, caption", [
    ("usr/share/games/megaglest/techs/megapack/commondata/sounds/archer_ack14.wav", ("megaglest-data", "megaglest"),
     "archer ack"),
    ("usr/share/games/megaglest/techs/megapack/factions/norsemen/units/swordman/sounds/swordman_die1.wav",
     ("megaglest",), "norsemen swordman die"),
    ("usr/share/games/minetest/games/minetest_game/mods/default/sounds/default_gravel_footstep.3.ogg",
     ("minetest-data", "minetest"), "gravel footstep"),
    ("usr/share/games/hedgewars/Data/Sounds/1C.ogg", ("hedgewars",), ""),
])
def test_clean_caption_keeps_sound_words_only(path, drop, caption):
    assert clean_caption(path, drop) == caption


@pytest.mark.parametrize("path, label", [
    ("factions/norsemen/units/swordman/sounds/swordman_select4.wav", "speech"),  # a voice line, not a sword
    ("factions/norsemen/units/swordman/sounds/swordman_die1.wav", "scream"),
    ("wesnoth/1.16/data/core/sounds/wolf-hit-2.ogg", "animal"),  # source before the generic event
    ("wesnoth/1.16/data/core/sounds/human-hit-3.ogg", "impact"),
    ("mods/default/sounds/default_snow_footstep.2.ogg", "footsteps"),
    ("baseoa/pak0.pk3.d/sound/weapons/grenade/hgrenb1a.wav", "explosion"),
    ("wesnoth/1.16/data/core/sounds/horse-canter.wav", "horse"),
    ("wesnoth/1.16/data/core/sounds/gold.ogg", None),
])
def test_keyword_label_ordered_rule(path, label):
    assert keyword_label(path) == label


def test_split_of_is_deterministic_and_near_the_fractions():
    paths = [f"pkg/sounds/clip{i}.ogg" for i in range(4000)]
    splits = [split_of(p, 0.1, 0.05) for p in paths]
    assert splits == [split_of(p, 0.1, 0.05) for p in paths]
    assert abs(splits.count("test") / 4000 - 0.1) < 0.02
    assert abs(splits.count("valid") / 4000 - 0.05) < 0.015


def _wav(path: Path, seed: int, seconds: float = 0.6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).standard_normal(int(22050 * seconds)) * 0.2
    sf.write(path, noise.astype(np.float32), 22050)


def _deb(cache: Path, name: str, files: dict[str, int], archive: dict[str, int] | None = None) -> None:
    """A real .deb of ``name`` holding WAVs at ``files`` (path -> noise seed), optionally a .pk3."""
    src = cache / "build" / name
    for rel, seed in files.items():
        _wav(src / rel, seed)
    if archive:
        pk3 = src / "usr/share/games" / name / "pak0.pk3"
        pk3.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache / "build" / f"{name}-member.wav"
        with zipfile.ZipFile(pk3, "w") as z:
            for member, seed in archive.items():
                _wav(tmp, seed)
                z.write(tmp, member)
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: 0.0-test\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: fixture\n")
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(src), str(cache / "debs" / f"{name}_0.0-test_all.deb")],
                   check=True, capture_output=True)


def _read_split(out: Path, split: str) -> list[dict]:
    metas = []
    for tar in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar) as t:
            metas += [json.load(t.extractfile(m)) for m in t.getmembers() if m.name.endswith(".json")]
    return metas


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus built by the tool from two real .debs: (cache, out)."""
    tmp_path = tmp_path_factory.mktemp("real_corpus")
    cache = tmp_path / "cache"
    game = "usr/share/games/minetest"
    train_files = {f"{game}/mods/default/sounds/default_gravel_footstep.{i}.wav": i for i in range(12)}
    train_files.update({f"{game}/mods/tnt/sounds/tnt_explode.{i}.wav": 100 + i for i in range(12)})
    train_files[f"{game}/music/theme.wav"] = 999  # a music folder: never a clip
    _deb(cache, "minetest-data", train_files,
         archive={"sound/weapons/grenade/hgrenb1a.wav": 500, "../../escape.wav": 501})
    held = {f"usr/share/games/wesnoth/1.16/data/core/sounds/wolf-growl-{i}.wav": 300 + i for i in range(3)}
    held["usr/share/games/wesnoth/1.16/data/core/sounds/human-hit-1.wav"] = 400
    _deb(cache, "wesnoth-1.16-data", held)
    out = tmp_path / "shards"
    rc = real_corpus(["--out", str(out), "--cache", str(cache), "--packages", "minetest-data",
                      "--heldout", "wesnoth-1.16-data", "--workers", "1", "--quiet", "--test-frac", "0.25",
                      "--valid-frac", "0.0"])
    assert rc == 0
    return cache, out


def test_real_corpus_tool_builds_labelled_splits_from_debs(corpus):
    cache, out = corpus
    # The zip member that tried to leave its folder was not extracted anywhere.
    assert not list(cache.rglob("escape.wav"))
    held = _read_split(out, "heldout")
    assert sorted((m["text"][0], m["tag"][0]) for m in held) == [("human hit", "impact")] + [("wolf growl", "animal")] * 3
    trained = _read_split(out, "train") + _read_split(out, "test")
    assert len(trained) == 25  # 24 loose files + 1 from the archive; the music track is not a clip
    by_caption = {m["text"][0]: m["tag"] for m in trained}
    assert by_caption == {"gravel footstep": ["footsteps"], "tnt explode": ["explosion"],
                          "weapons grenade hgrenb": ["explosion"]}
    rows = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows if r["id"].startswith("wesnoth")} == {"heldout"}
    assert {r["split"] for r in rows if r["id"].startswith("minetest")} == {"train", "test"}


@pytest.mark.slow
def test_real_recipe_trains_and_reports_on_the_corpus(corpus, tmp_path):
    # What `make real` runs, shortened: configs/real.yaml through the trainer CLI on the tool's
    # shards, then tools/real_report.py over the test split and the held-out package.
    _, out = corpus
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    train = subprocess.run(
        [sys.executable, "-m", "clapscale.train.cli", "configs/real.yaml", f"data.train={out}/train/*.tar",
         f"data.val={out}/test/*.tar", "data.batch_size=4", "data.workers=0", "train.steps=2",
         "train.eval_every=-1", f"train.out_dir={tmp_path}", "train.name=real"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
    report = subprocess.run(
        [sys.executable, "tools/real_report.py", "--checkpoint", str(tmp_path / "real" / "model"), "--shards", str(out),
         "--out", str(tmp_path / "metrics.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"test", "heldout"}
    held = {r["task"]: r for r in metrics["heldout"]["results"]}
    assert held["retrieval"]["info"]["clips"] == 4
    # Single-label zero-shot over the package's two labels, with macro recall and the majority baseline.
    assert held["zeroshot"]["info"]["labels"] == 2 and "macro_recall" in held["zeroshot"]["metrics"]
    assert held["zeroshot"]["baseline"] == pytest.approx({"top1": 75.0, "macro_recall": 50.0})
    per_class = held["zeroshot"]["info"]["per_class"]
    assert {k: v["clips"] for k, v in per_class.items()} == {"animal": 3, "impact": 1}
    assert sum(v["predicted"] for v in per_class.values()) == 4
    assert sum(v["recall"] for v in per_class.values()) / 2 == pytest.approx(held["zeroshot"]["metrics"]["macro_recall"])
    assert "majority" in report.stdout


def test_real_corpus_refuses_packages_outside_the_training_list(tmp_path, capsys):
    rc = real_corpus(["--out", str(tmp_path / "o"), "--cache", str(tmp_path), "--packages", "freedoom"])
    assert rc == 2
    assert "freedoom" in capsys.readouterr().err


def test_real_corpus_refuses_a_heldout_package_that_is_also_trained(tmp_path, capsys):
    rc = real_corpus(["--out", str(tmp_path / "o"), "--cache", str(tmp_path), "--packages", "minetest-data",
                      "--heldout", "minetest-data"])
    assert rc == 2
    assert "never trained on" in capsys.readouterr().err


def test_unpack_archives_and_find_sounds_skip_music_and_hidden(tmp_path):
    _wav(tmp_path / "a/sounds/hit.wav", 1)
    _wav(tmp_path / "a/Music/track.wav", 2)
    _wav(tmp_path / "a/.hidden/x.wav", 3)
    with zipfile.ZipFile(tmp_path / "a/base.wz", "w") as z:
        z.write(tmp_path / "a/sounds/hit.wav", "audio/sfx/boom.wav")
        z.writestr("texts/readme.txt", "not audio")
    assert unpack_archives(tmp_path) == 1
    found = [p.relative_to(tmp_path).as_posix() for p in find_sounds(tmp_path)]
    assert found == ["a/base.wz.d/audio/sfx/boom.wav", "a/sounds/hit.wav"]


@pytest.mark.slow
def test_real_gpu_script_runs_end_to_end_on_cpu_for_two_steps(corpus, tmp_path):
    # launch/real_gpu.sh with configs/real-gpu.yaml (CNN14), shortened to two fp32 steps on the CPU:
    # the recipe, the script's stages and its timings file cannot rot between GPU sessions.
    _, out = corpus
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHON=sys.executable, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    # --out is replaced only when it is a run: another folder is refused and left as it is.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = subprocess.run(["bash", "launch/real_gpu.sh", "--shards", str(out), "--out", str(other), "--device", "cpu"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not replacing it" in refused.stderr
    assert (other / "keep.txt").read_text() == "mine"
    run = tmp_path / "real-gpu"
    proc = subprocess.run(
        ["bash", "launch/real_gpu.sh", "--shards", str(out), "--out", str(run), "--device", "cpu",
         "train.steps=2", "train.precision=fp32", "train.eval_every=-1", "data.val=", "data.batch_size=4", "data.workers=0",
         "data.shuffle_buffer=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    cfg = yaml.safe_load((run / "model" / "config.yaml").read_text())
    assert cfg["model"]["audio"] == {**cfg["model"]["audio"], "name": "cnn", "size": "14"}
    assert cfg["data"]["caption"] == "text_or_tags" and cfg["augment"]["time_masks"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"test", "heldout"}
    times = json.loads((run / "timings.json").read_text())
    assert set(times) == {"corpus_s", "train_s", "report_s", "total_s"} and times["corpus_s"] < 5  # --shards: no build
