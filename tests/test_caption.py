"""The tag-guided captioner (clapscale.caption): metrics, schedule, decoding, training, generation.

- metrics against independent references: BLEU-4 against NLTK's corpus_bleu, ROUGE-L and tag
  recall against hand-computed values;
- the learning-rate schedule against its closed form; the label-smoothed loss against a manual
  computation; greedy ``generate`` against a step-by-step argmax over ``decode``;
- training (real shards, 1 spawned process): a run stopped after its step-2 checkpoint and resumed
  ends with the same weights as an uninterrupted run; the exported captioner is the average of
  the last checkpoints;
- the path users take (subprocesses): ``clapscale caption train`` on 2 gloo ranks under torchrun,
  ``clapscale caption generate`` greedy on 1 process and on 2 ranks gives identical shard sets,
  skips (and counts) the clip whose tag the captioner never saw, keeps the original captions,
  records the captioner checksum in the manifest, and a rerun resumes instead of redoing.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clapscale.caption.metrics import bleu4, rouge_l, tag_recall

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ metrics


def test_bleu4_matches_nltk_corpus_bleu():
    from nltk.translate.bleu_score import corpus_bleu

    hyps = ["a dog barks loudly in the distance", "rain falls on a tin roof while wind blows",
            "a car engine starts and idles"]
    refs = [["a dog is barking loudly in the distance", "a dog barks far away"],
            ["rain falls on a metal roof as the wind blows"],
            ["a car engine starts then idles", "an engine is started", "a motor idles"]]
    ours = bleu4(hyps, refs)
    theirs = corpus_bleu([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps])
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert 0.2 < ours < 0.9
    assert bleu4(["a dog barks in the rain"], [["a dog barks in the rain"]]) == pytest.approx(1.0)


def test_rouge_l_and_tag_recall_known_values():
    # LCS("a b c d", "a c d e") = 3: P = R = 3/4; the better reference wins.
    assert rouge_l(["a b c d"], [["a c d e", "x y"]]) == pytest.approx(0.75)
    # LCS = 2 of 4 hypothesis words and 2 of 2 reference words: F = 2PR/(P+R) = 2/3.
    assert rouge_l(["a b c d"], [["b d"]]) == pytest.approx(2 / 3)
    # 3 of 4 (clip, tag) pairs: "white_noise" matches "White noise", "chirp" is missing.
    assert tag_recall(["White noise, then a low tone.", "A dog."], [["white_noise", "low tone"], ["dog", "chirp"]]) \
        == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l(["a"], [[]])


# ------------------------------------------------------------------------------------ units


def test_warmup_then_exponential_decay_closed_form():
    from clapscale.caption.train import WarmupExponential

    f = WarmupExponential(5e-4, 5e-7, warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(math.sqrt(1e-3))  # half-way through the decay: geometric mean
    assert 5e-4 * f(110) == pytest.approx(5e-7)


def _tiny_captioner(n_tokens=12, n_tags=3, seed=0):
    from clapscale.caption.model import TagGuidedCaptioner

    torch.manual_seed(seed)
    return TagGuidedCaptioner(_ToyTower(), n_tokens, n_tags, d_model=16, layers=1, heads=2, ff_dim=32, dropout=0.0,
                              audio_tokens=2, max_length=8).eval()


class _ToyTower(torch.nn.Module):
    out_dim = 8

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 8)

    def forward(self, mel, is_longer=None):
        return self.lin(mel.mean(dim=(1, 2))[:, :5])


def test_label_smoothed_loss_ignores_padding():
    from clapscale.caption.model import PAD, caption_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6)
    tokens = torch.tensor([[1, 4, 5, 2], [1, 4, 2, PAD]])
    eps = 0.1
    terms = []
    for b in range(2):
        for t in range(3):
            y = int(tokens[b, t + 1])
            if y == PAD:
                continue
            logp = torch.log_softmax(logits[b, t], -1)
            terms.append(-(1 - eps) * logp[y] - eps * logp.mean())
    assert caption_loss(logits, tokens, eps) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-6)


def test_greedy_generate_is_stepwise_argmax_and_beam_is_batched():
    from clapscale.caption.model import BOS, EOS, generate

    model = _tiny_captioner()
    mel = torch.randn(3, 1, 20, 5)
    longer = torch.zeros(3, dtype=torch.bool)
    tags = torch.tensor([[1, 2], [3, 0], [0, 0]])
    got = generate(model, mel, longer, tags, beam=1)
    for b in range(3):
        memory, pad = model.encode(mel[b : b + 1], longer[b : b + 1], tags[b : b + 1])
        seq = [BOS]
        for _ in range(model.max_length - 1):
            nxt = int(model.decode(torch.tensor([seq]), memory, pad)[0, -1].argmax())
            if nxt == EOS:
                break
            seq.append(nxt)
        assert got[b] == seq[1:], b
    # Beam search gives each clip the caption it gets alone (batching does not change it).
    beams = generate(model, mel, longer, tags, beam=3)
    for b in range(3):
        assert generate(model, mel[b : b + 1], longer[b : b + 1], tags[b : b + 1], beam=3)[0] == beams[b]


# ------------------------------------------------------------------------------------ runs


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_corpus(root: Path) -> None:
    from clapscale.shards.synthetic import generate
    from clapscale.shards.writer import write_shards

    write_shards(generate("train", 24, seed=3), root / "shards", "train", shard_size=8)
    held_out = list(generate("valid", 9, seed=4))
    held_out[4] = dict(held_out[4], tag=["a tag the captioner never saw"])
    write_shards(held_out, root / "shards", "valid", shard_size=3)


def _recipe(root: Path, *extra: str) -> list[str]:
    return [f"data.train={root}/shards/train/{{000000..000002}}.tar", "data.batch_size=4", "data.workers=1",
            "data.shuffle_buffer=8", "data.resampled=false", f"model.text.path={root}/text", "model.d_model=32", "model.layers=1",
            "model.heads=2", "model.ff_dim=64", "model.audio.name=cnn", "model.audio.size=tiny", "optim.warmup_steps=2",
            f"train.out_dir={root}/runs", "train.steps=4", "train.checkpoint_every=2", "train.average_last=2", *extra]


def _resume_run(rank: int, root: str, out: str) -> None:
    """Spawned (1 process): an uninterrupted 4-step run, and one whose step-4 state is lost."""
    import shutil

    from clapscale.caption.config import load_caption_config
    from clapscale.caption.train import STATE_FILE, CaptionTrainer, average_checkpoints
    from clapscale.train.distributed import DistEnv

    torch.set_num_threads(1)
    root = Path(root)
    denv = DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single")
    straight = CaptionTrainer(load_caption_config(None, _recipe(root, "train.name=a")), denv)
    straight.train()
    ckpts = root / "runs" / "a" / "checkpoints"
    found = {"a4": torch.load(ckpts / "step_00000004" / STATE_FILE, weights_only=True)["model"],
             "avg": average_checkpoints([ckpts / "step_00000002", ckpts / "step_00000004"]),
             "losses": straight.losses}
    shutil.copytree(root / "runs" / "a", root / "runs" / "b")
    shutil.rmtree(root / "runs" / "b" / "checkpoints" / "step_00000004")  # "killed" after step 2's save
    shutil.rmtree(root / "runs" / "b" / "captioner")
    resumed = CaptionTrainer(load_caption_config(None, _recipe(root, "train.name=b")), denv)
    resumed.setup()
    found["resumed_at"] = resumed.step
    resumed.train()
    found["b4"] = torch.load(root / "runs" / "b" / "checkpoints" / "step_00000004" / STATE_FILE,
                             weights_only=True)["model"]
    found["b_losses"] = resumed.losses
    torch.save(found, out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from test_inference import _tiny_text_dir

    root = tmp_path_factory.mktemp("caption")
    _write_corpus(root)
    _tiny_text_dir(root / "text")
    return root


@pytest.mark.slow
def test_resumed_captioner_training_equals_an_uninterrupted_run_and_export_averages(corpus):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_resume_run, args=(str(corpus), str(corpus / "resume.pt")), nprocs=1, join=True)
    found = torch.load(corpus / "resume.pt", weights_only=False)
    assert found["resumed_at"] == 2
    assert found["b_losses"] == pytest.approx(found["losses"][2:], abs=0)
    for k, v in found["a4"].items():
        assert torch.equal(found["b4"][k], v), k
    exported = load_file(str(corpus / "runs" / "a" / "captioner" / "captioner.safetensors"))
    for k, v in found["avg"].items():
        assert torch.equal(exported[k], v.float() if v.is_floating_point() else v), k
    assert not torch.equal(exported["word_embed.weight"], found["a4"]["word_embed.weight"])


def _cli(nproc: int, args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "clapscale.cli", "caption", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "clapscale.caption.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _shard_set(out: Path) -> dict[str, dict]:
    from clapscale.data.shardio import iter_tar_samples

    samples = {}
    for tar in sorted((out / "train").glob("*.tar")):
        for raw in iter_tar_samples(str(tar), lambda *a: None):
            samples[raw["__key__"]] = {"tar": tar.name, "json": json.loads(raw["json"]), "flac": len(raw["flac"])}
    return samples


@pytest.mark.slow
def test_two_rank_training_and_generation_equal_one_process_greedy(corpus, tmp_path):
    from clapscale.caption.generate import generate_shards

    (tmp_path / "recipe.yaml").write_text("train:\n  log_every: 1\n")
    _cli(2, ["train", str(tmp_path / "recipe.yaml"), *_recipe(corpus, "train.name=ddp")])
    captioner = corpus / "runs" / "ddp" / "captioner"
    assert (captioner / "captioner.safetensors").is_file()

    spec = f"{corpus}/shards/valid/{{000000..000002}}.tar"
    gen = ["generate", "--captioner", str(captioner), "--shards", spec, "--greedy", "--batch-size", "2",
           "--no-progress"]
    two = _cli(2, [*gen, "--out", str(tmp_path / "two")])
    assert "skipped 1 clips with tags unseen" in two.stdout
    # One process, in this one (the same function the command runs).
    summary = generate_shards(captioner, spec, tmp_path / "one", "train", beam=1, batch_size=3, progress=False)
    assert (summary.written, summary.skipped_unseen_tag, summary.shards_resumed) == (8, 1, 0)
    a, b = _shard_set(tmp_path / "one"), _shard_set(tmp_path / "two")
    assert len(a) == 8 and a == b  # 9 clips, one with a tag the captioner never saw
    for sample in a.values():
        meta = sample["json"]
        assert len(meta["text"]) == 1 and meta["text"][0]
        assert meta["original_text"] and meta["original_text"] != meta["text"]
    from clapscale.caption.export import captioner_checksum

    for out in ("one", "two"):
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())["splits"]["train"]
        assert manifest["captioner_sha256"] == captioner_checksum(captioner)
        assert manifest["samples"] == 8 and manifest["skipped_unseen_tag"] == 1 and manifest["beam"] == 1
    # A rerun finds every shard done and rewrites nothing.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "one" / "train").glob("*.tar")}
    again = generate_shards(captioner, spec, tmp_path / "one", "train", beam=1, batch_size=3, progress=False)
    assert again.shards_resumed == 3 and again.written == 8
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one" / "train").glob("*.tar")} == before


@pytest.mark.parametrize("recipe", sorted(str(p) for p in (REPO / "configs" / "caption").glob("*.yaml")))
def test_every_captioner_recipe_loads(recipe):
    from clapscale.caption.config import load_caption_config
    from clapscale.models.registry import audio_entry, text_entry

    cfg = load_caption_config(recipe)
    audio_entry(cfg.model.audio.name, cfg.model.audio.size, cfg.model.audio.fusion)
    text_entry(cfg.model.text.name)


def test_stage_recipes_chain_through_init_from():
    from clapscale.config import load_config

    stage1, stage2 = load_config(REPO / "configs" / "stage1-synthetic.yaml"), load_config(REPO / "configs" / "stage2-real.yaml")
    assert stage2.train.init_from == f"{stage1.train.out_dir}/{stage1.train.name}/model"
    assert stage1.model == stage2.model and stage1.audio == stage2.audio  # weights fit


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_and_the_resumed_run_exports_the_uninterrupted_captioner(corpus, tmp_path):
    """As under Slurm: a signal that reaches one rank of ``caption train`` on 2 gloo ranks stops both at
    the same step after a checkpoint (off the checkpoint grid), writes the requeue marker and exports
    nothing; the rerun resumes and exports, bit for bit, the captioner of an uninterrupted run (the
    stop checkpoint is never averaged)."""
    import signal
    import time

    import psutil
    from safetensors.torch import load_file

    marker = tmp_path / "requeue"
    (tmp_path / "recipe.yaml").write_text("train:\n  log_every: 1\n")

    def args(name: str) -> list[str]:
        return ["train", str(tmp_path / "recipe.yaml"),
                *_recipe(corpus, f"train.name={name}", "train.steps=60", "train.checkpoint_every=30", "train.average_last=2")]

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "clapscale.caption.cli", *args("sig")]
    env = dict(_env(), CLAPSCALE_REQUEUE_FILE=str(marker))
    ckpts = corpus / "runs" / "sig" / "checkpoints"
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + 180
        # The export averages steps 30 and 60: a stop checkpoint between them must not displace 30.
        while not (ckpts / "step_00000030").is_dir() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        workers = [p for p in psutil.Process(proc.pid).children() if "clapscale.caption.cli" in " ".join(p.cmdline())]
        assert len(workers) == 2
        time.sleep(0.3)  # a few steps past 30: the stop lands off the grid
        workers[-1].send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=180)
    assert marker.is_file(), out[-3000:]
    stopped_at = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert 30 < stopped_at < 60
    assert sorted(p.name for p in ckpts.iterdir())[-1] == f"step_{stopped_at:08d}"
    assert not (corpus / "runs" / "sig" / "captioner").exists()

    marker.unlink()
    done = _cli(2, args("sig"), timeout=400)  # resumes, then exports
    assert "done at step 60" in done.stdout and not marker.exists()
    assert len(json.loads((corpus / "runs" / "sig" / "losses.json").read_text())) == 60 - stopped_at
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000030", "step_00000060"]  # stop one dropped
    _cli(2, args("ref"), timeout=400)
    got = load_file(str(corpus / "runs" / "sig" / "captioner" / "captioner.safetensors"))
    want = load_file(str(corpus / "runs" / "ref" / "captioner" / "captioner.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
