"""User errors through the `clapscale` entry point, in real subprocesses: one line on stderr that names
the thing and what to do, a non-zero exit, no traceback; bugs keep their traceback; --debug and
CLAPSCALE_DEBUG=1 show it for user errors too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from clapscale.cli import main as cli_main
from clapscale.config import load_config
from clapscale.errors import EXIT_USER_ERROR, UserError, run_command

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")
    env.pop("CLAPSCALE_DEBUG", None)
    env.update(extra)
    return env


def _clapscale(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clapscale.cli", *map(str, args)], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and one `clapscale ...:` line that holds every needle; returns that line."""
    assert proc.returncode == EXIT_USER_ERROR, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("clapscale ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from test_inference import _tiny_text_dir

    from clapscale.models import build_model, save_model

    root = tmp_path_factory.mktemp("cli_errors")
    text = _tiny_text_dir(root / "text")
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"model.text.path={text}", "model.text.pretrained=false", "model.embed_dim=64"])
    torch.manual_seed(0)
    return save_model(build_model(cfg), cfg, root / "model")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_audio") / "tone.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * np.arange(24000) / 48000)).astype(np.float32), 48000)
    return path


def _copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def test_damaged_weights_and_config_are_named(model_dir, clip, tmp_path):
    # A download cut short: the safetensors header promises more bytes than the file holds.
    cut = _copy(model_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = _clapscale("embed", "--checkpoint", cut, clip, "--out", tmp_path / "e.npy")
    _assert_user_error(proc, str(weights), "damaged", "copy or export it again")
    # A config edited by hand into invalid YAML.
    bad_yaml = _copy(model_dir, tmp_path / "yaml")
    (bad_yaml / "config.yaml").write_text("model: [unclosed\n  audio: {\n")
    proc = _clapscale("zeroshot", "--checkpoint", bad_yaml, "--labels", "a,b", clip)
    _assert_user_error(proc, str(bad_yaml / "config.yaml"), "damaged")
    # Valid YAML with a wrong value: the file and the field are named.
    bad_value = _copy(model_dir, tmp_path / "value")
    text = (bad_value / "config.yaml").read_text()
    (bad_value / "config.yaml").write_text(text.replace("embed_dim: 64", "embed_dim: many"))
    proc = _clapscale("eval", "--checkpoint", bad_value, "--shards", "x.tar")
    _assert_user_error(proc, str(bad_value / "config.yaml"), "embed_dim")


def test_unwritable_out_fails_before_the_work(model_dir, clip, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _clapscale("embed", "--checkpoint", model_dir, clip, "--out", blocker / "emb.npy")
    line = _assert_user_error(proc, "--out", str(blocker / "emb.npy"), "cannot write there", "choose another path")
    assert "embedding" not in proc.stderr.replace(line, "")  # refused before any clip was embedded


def test_unknown_tower_names_the_known_ones(capsys):
    # It used to print an empty table and exit 0. (In process: the same entry point, no torch start-up.)
    assert cli_main(["models", "--audio", "bogus"]) == EXIT_USER_ERROR
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "clapscale models: error: --audio: unknown tower bogus; known: htsat, cnn, vit, esresnext\n"
    assert cli_main(["models", "--text", "gpt"]) == EXIT_USER_ERROR
    assert "known: minilm, bert, roberta, clip" in capsys.readouterr().err


def test_batch_larger_than_the_data_set_is_one_line(tmp_path):
    from clapscale.shards.synthetic import generate
    from clapscale.shards.writer import write_shards

    write_shards(generate("train", 6), tmp_path / "sh", split="train", shard_size=8)
    tar = next((tmp_path / "sh" / "train").glob("*.tar"))
    proc = _clapscale("train", "configs/tiny.yaml", f"data.train={tar}", f"data.val={tar}", "data.batch_size=16",
                      "data.workers=0", "train.steps=1", f"train.out_dir={tmp_path / 'run'}", timeout=240)
    _assert_user_error(proc, "6 samples", "data.batch_size=16")


def test_missing_val_shards_fail_at_start_not_after_training(tmp_path):
    # data.val was read only at the first evaluation: a typo there cost the whole run. With 100000
    # steps to go, only a check at start-up can answer within the timeout.
    from clapscale.shards.synthetic import generate
    from clapscale.shards.writer import write_shards

    (tar,) = write_shards(generate("train", 4), tmp_path / "sh", split="train", shard_size=8)
    proc = _clapscale("train", "configs/tiny.yaml", f"data.train={tar}", f"data.val={tmp_path / 'valid' / '0.tar'}",
                      "data.batch_size=2", "data.workers=0", "train.steps=100000", "train.eval_every=0",
                      f"train.out_dir={tmp_path / 'run'}", timeout=120)
    _assert_user_error(proc, "no such file", str(tmp_path / "valid" / "0.tar"))


def test_bugs_keep_their_traceback_and_debug_shows_user_errors(capsys, monkeypatch):
    def bug(argv):
        raise KeyError("an internal invariant broke")

    def user_error(argv):
        raise UserError("--thing x: not usable; do y")

    with pytest.raises(KeyError):
        run_command("clapscale demo", bug, [])
    assert run_command("clapscale demo", user_error, []) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "clapscale demo: error: --thing x: not usable; do y\n"
    with pytest.raises(UserError):
        run_command("clapscale demo", user_error, [], debug=True)
    # The switches, through the entry point: the user error is raised (a traceback) instead.
    with pytest.raises(UserError, match="unknown tower"):
        cli_main(["--debug", "models", "--audio", "bogus"])
    monkeypatch.setenv("CLAPSCALE_DEBUG", "1")
    with pytest.raises(UserError, match="unknown tower"):
        cli_main(["models", "--audio", "bogus"])
    monkeypatch.setenv("CLAPSCALE_DEBUG", "0")
    assert cli_main(["models", "--audio", "bogus"]) == EXIT_USER_ERROR


@pytest.mark.parametrize("entry", [["-m", "clapscale.cli", "shards"], ["tools/make_shards.py"]])
def test_make_shards_unwritable_out_is_one_line(tmp_path, entry):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, *entry, "--synthetic", "10", "--out", str(blocker / "shards"), "--quiet"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert str(blocker) in line and "Not a directory" in line, line


def test_train_module_entry_blocked_out_dir_is_one_line(tmp_path):
    # `python -m clapscale.train.cli` is what torchrun and launch/pretrain.sh (srun) start.
    from clapscale.shards.synthetic import generate
    from clapscale.shards.writer import write_shards

    (tar,) = write_shards(generate("train", 4), tmp_path / "sh", split="train", shard_size=8)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "clapscale.train.cli", "configs/tiny.yaml", f"data.train={tar}", f"data.val={tar}",
         "data.batch_size=2", "data.workers=0", "train.steps=1", f"train.out_dir={blocker / 'runs'}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    _assert_user_error(proc, str(blocker), "Not a directory")


def test_malformed_recipe_and_override_name_the_place(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  audio: {name: cnn\ntrain: {steps: 3}\n")
    assert cli_main(["train", str(recipe)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"clapscale train: {recipe} is not valid YAML at line 3") and err.count("\n") == 1, err
    assert cli_main(["train", "configs/tiny.yaml", "train.steps=[1"]) == EXIT_USER_ERROR
    assert "override 'train.steps=[1' is not valid YAML" in capsys.readouterr().err
