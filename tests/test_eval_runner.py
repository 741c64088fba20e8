"""The evaluation runner on real shards with a real (randomly initialised) tiny CLAP:

- its numbers equal a direct computation (clips embedded one by one through the inference API,
  captions through the model, metrics on the resulting similarity matrix);
- two gloo ranks with unequal sample and batch counts give the same numbers as one process, with
  and without `eval.max_clips`;
- a batch that cannot be evaluated on one rank raises on both ranks (no hang);
- `clapscale eval` prints figures next to chance and writes JSON; bad inputs fail clearly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clapscale.config import load_config
from clapscale.data.wds import decode_audio
from clapscale.eval.cli import eval_main
from clapscale.eval.metrics import majority_baseline, retrieval_metrics, zeroshot_metrics
from clapscale.eval.runner import evaluate, evaluate_tasks, limit_spec
from clapscale.eval.zeroshot import prompts_for
from clapscale.shards.synthetic import generate
from clapscale.shards.writer import write_shards
from test_eval_gather import run_two_ranks
from test_inference import _tiny_text_dir

N_CLIPS = 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clapscale.models import build_model, save_model

    root = tmp_path_factory.mktemp("eval")
    # Shards of 3 samples: 7 clips -> 3 tars; ranks get 4 and 3 clips.
    write_shards(generate("valid", N_CLIPS, seed=5), root / "shards", "valid", shard_size=3)
    spec = str(root / "shards" / "valid" / "{000000..000002}.tar")
    cfg = load_config(
        "configs/tiny.yaml",
        [f"model.text.path={_tiny_text_dir(root / 'text')}", "model.text.pretrained=false", "model.embed_dim=64",
         "data.workers=0", "eval.batch_size=3", f"data.val={spec}"],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_model(model, cfg, root / "model")
    return {"root": root, "spec": spec, "cfg": cfg, "model": model}


@pytest.fixture(scope="module")
def direct(setup):
    return _direct_embeddings(setup)


def _direct_embeddings(setup):
    """Independent path: decode each FLAC from the tar, embed it alone with the inference API."""
    import tarfile

    from clapscale.inference import load

    clap = load(setup["root"] / "model", device="cpu")
    clips = {}
    for tar in sorted((setup["root"] / "shards" / "valid").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".flac"):
                key = name[: -len(".flac")]
                meta = json.loads(members[key + ".json"])
                clips[key] = (decode_audio(data, setup["cfg"].audio), meta)
    keys = sorted(clips)
    audio = torch.cat([clap.embed_audio(clips[k][0], sample_rate=48000) for k in keys])
    texts = [c for k in keys for c in clips[k][1]["text"]]
    owner = torch.tensor([i for i, k in enumerate(keys) for _ in clips[k][1]["text"]])
    caps = clap.embed_text(texts)
    return clap, keys, clips, audio, caps, owner


def test_evaluate_matches_direct_computation(setup, direct):
    cfg = setup["cfg"]
    results = evaluate_tasks(setup["model"], cfg, rank=0, world_size=1, device="cpu")
    by_task = {r.task: r for r in results}
    clap, keys, clips, audio, caps, owner = direct

    direct = retrieval_metrics(audio @ caps.T, owner)
    got = by_task["retrieval"].metrics
    assert set(got) == set(direct)
    for k in direct:
        assert got[k] == pytest.approx(direct[k], abs=1e-9), k
    assert by_task["retrieval"].info == {"clips": N_CLIPS, "captions": int(owner.numel())}

    labels = sorted({t for k in keys for t in clips[k][1]["tag"]})
    label_emb = torch.nn.functional.normalize(clap.embed_text([prompts_for(lab)[0] for lab in labels]), dim=1)
    targets = torch.tensor([[lab in clips[k][1]["tag"] for lab in labels] for k in keys])
    direct_zs = zeroshot_metrics(audio @ label_emb.T, targets)
    assert by_task["zeroshot"].metrics == pytest.approx(direct_zs)
    assert by_task["zeroshot"].chance["top1"] > 0
    assert by_task["zeroshot"].baseline == pytest.approx(majority_baseline(targets))

    flat = evaluate(setup["model"], cfg, rank=0, world_size=1, device="cpu")
    assert flat["retrieval/t2a/R@1"] == got["t2a/R@1"] and "zeroshot/mAP" in flat
    assert not setup["model"].training  # restored to the mode it was in


def _dist_worker(rank: int, world: int, port: int, setup_paths: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from clapscale.models import load_model

        model, cfg = load_model(setup_paths["model"])
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=setup_paths["spec"], workers=0))
        results = evaluate_tasks(model, cfg, rank=rank, world_size=world, device="cpu")
        torch.save([r.to_dict() for r in results], os.path.join(out_dir, f"{rank}.pt"))
        capped = evaluate_tasks(model, _capped(cfg), rank=rank, world_size=world, device="cpu")
        torch.save([r.to_dict() for r in capped], os.path.join(out_dir, f"{rank}-capped.pt"))
    finally:
        dist.destroy_process_group()


def _capped(cfg):
    # 4 of 7 clips: not a whole number of shards (3 each) nor of batches (3), and on 2 ranks the
    # clips kept are not an even split of what each rank reads.
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_clips=4))


@pytest.mark.slow
def test_two_ranks_match_one_process(setup, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = {"model": str(setup["root"] / "model"), "spec": setup["spec"]}
    mp.spawn(_dist_worker, args=(2, port, paths, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0 == r1  # identical on every rank
    single = [r.to_dict() for r in evaluate_tasks(setup["model"], setup["cfg"], rank=0, world_size=1, device="cpu")]
    assert [r["task"] for r in r0] == [r["task"] for r in single]
    for a, b in zip(r0, single):
        assert a["info"] == b["info"]
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
        assert a["chance"] == pytest.approx(b["chance"])

    # eval.max_clips keeps the same clips whatever the number of ranks.
    c0, c1 = (torch.load(tmp_path / f"{r}-capped.pt") for r in (0, 1))
    assert c0 == c1
    single = [r.to_dict() for r in evaluate_tasks(setup["model"], _capped(setup["cfg"]), rank=0, world_size=1, device="cpu")]
    assert c0[0]["info"]["clips"] == single[0]["info"]["clips"] == 4
    for a, b in zip(c0, single, strict=True):
        assert a["info"] == b["info"]
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
        assert a["chance"] == pytest.approx(b["chance"])


def test_max_clips_and_unknown_task(setup, direct):
    cfg = setup["cfg"]
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_clips=4, tasks=["retrieval"]))
    (r,) = evaluate_tasks(setup["model"], cfg, rank=0, world_size=1, device="cpu")
    assert r.info["clips"] == 4
    _, keys, _, audio, caps, owner = direct
    # The 4 smallest keys of the 2 leading shards (6 clips), here the 4 smallest of the split.
    keep = owner < 4
    want = retrieval_metrics(audio[:4] @ caps[keep].T, owner[keep])
    assert r.metrics == pytest.approx(want, abs=1e-9)
    urls = [setup["spec"].replace("{000000..000002}", f"{i:06d}") for i in range(3)]
    assert limit_spec(setup["spec"], 4) == "::".join(urls[:2])
    assert limit_spec(setup["spec"], 3) == urls[0]
    assert limit_spec(setup["spec"], 7) == limit_spec(setup["spec"], 100) == limit_spec(setup["spec"], 0) == setup["spec"]
    with pytest.raises(ValueError, match="unknown evaluation task"):
        evaluate_tasks(setup["model"], cfg, rank=0, world_size=1, device="cpu", tasks=["nope"])


# Rank 1's loader yields one batch whose first clip lost its captions (as a caption-less clip of a
# custom loader would arrive); everything else is the real model on the real shards.
_CAPTIONLESS_ON_RANK_1 = """
import dataclasses, json, sys
import torch, torch.distributed as dist
from clapscale.data import build_loader
from clapscale.eval.runner import evaluate_tasks
from clapscale.models import load_model
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model, cfg = load_model(sys.argv[1])
cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=sys.argv[2], workers=0))

def loader(spec):
    for i, batch in enumerate(build_loader(cfg, spec, rank=rank, world_size=2, train=False)):
        if rank == 1 and i == 0:
            batch["all_texts"] = [[]] + list(batch["all_texts"][1:])
        yield batch

try:
    evaluate_tasks(model, cfg, rank=rank, world_size=2, device="cpu", tasks=["retrieval"], loader_factory=loader)
    error = None
except Exception as e:
    error = {"type": type(e).__name__, "msg": str(e)}
print(json.dumps(error))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_captionless_batch_on_one_rank_fails_both(setup):
    (rc0, out0, err0), (rc1, out1, err1) = run_two_ranks(
        _CAPTIONLESS_ON_RANK_1, [str(setup["root"] / "model"), setup["spec"]], timeout=180)
    assert rc0 == rc1 == 0, err0[-2000:] + err1[-2000:]
    e0, e1 = json.loads(out0.splitlines()[-1]), json.loads(out1.splitlines()[-1])
    assert e1["type"] == "ValueError" and "clips without captions" in e1["msg"]
    assert e0["type"] == "RankFailedError" and "rank 1 failed" in e0["msg"] and "clips without captions" in e0["msg"]


def test_eval_cli_table_json_and_errors(setup, tmp_path, capsys):
    out = tmp_path / "res.json"
    model_dir = str(setup["root"] / "model")
    rc = eval_main(["--checkpoint", model_dir, "--shards", setup["spec"], "--task", "retrieval,zeroshot",
                    "--out", str(out), "--set", "data.workers=0"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "chance" in text and "text->audio R@1" in text and "top1" in text
    payload = json.loads(out.read_text())
    assert [r["task"] for r in payload["results"]] == ["retrieval", "zeroshot"]
    assert payload["results"][0]["chance"]["t2a/R@1"] == pytest.approx(100 / N_CLIPS)

    # Explicit labels (one the shards never use is fine; clips with none of them are left out).
    rc = eval_main(["--checkpoint", model_dir, "--shards", setup["spec"], "--task", "zeroshot",
                    "--labels", "low tone,high tone,bell,buzz,white noise,pink noise,brown noise", "--set", "data.workers=0"])
    assert rc == 0

    assert eval_main(["--checkpoint", str(tmp_path / "missing"), "--shards", setup["spec"]]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert eval_main(["--checkpoint", model_dir, "--shards", setup["spec"], "--task", "zeroshot", "--labels", ","]) == 2
    assert "--labels is empty" in capsys.readouterr().err
    assert eval_main(["--checkpoint", model_dir, "--shards", str(tmp_path / "none-{0..1}.tar")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "none-0.tar" in err and "Traceback" not in err
    assert eval_main(["--checkpoint", model_dir, "--task", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_table_shows_the_majority_baseline_of_single_label_zero_shot():
    from clapscale.eval.cli import format_results
    from clapscale.eval.runner import TaskResult

    targets = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 2]), 3).bool()
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    single = TaskResult("zeroshot", "x.tar", zeroshot_metrics(logits, targets), {}, {}, majority_baseline(targets))
    rows = {line.split()[0]: line.split() for line in format_results([single]).splitlines()[3:7]}
    assert rows["top1"][-1] == "60.00" and rows["macro_recall"][-1] == "33.33"  # 3 of 5 clips; 1 of 3 classes
    multi = TaskResult("zeroshot", "x.tar", {"mAP": 50.0}, {"mAP": 40.0})
    assert "majority" not in format_results([multi])


def test_linear_probe_task_matches_direct_fit(setup, direct):
    from clapscale.eval.linear_probe import linear_probe_metrics

    cfg = setup["cfg"]
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, linear_probe_train=setup["spec"]))
    (r,) = evaluate_tasks(setup["model"], cfg, rank=0, world_size=1, device="cpu", tasks=["linear_probe"])
    _, keys, clips, audio, _, _ = direct
    labels = sorted({t for k in keys for t in clips[k][1]["tag"]})
    targets = torch.tensor([[lab in clips[k][1]["tag"] for lab in labels] for k in keys])
    direct = linear_probe_metrics(audio, targets, audio, targets, weight_decay=cfg.eval.linear_probe_weight_decay)
    assert r.metrics == pytest.approx(direct, abs=1e-6)
    assert r.info["train_clips"] == N_CLIPS and r.info["labels"] == len(labels)
    with pytest.raises(ValueError, match="linear_probe_train"):
        evaluate_tasks(setup["model"], setup["cfg"], rank=0, world_size=1, device="cpu", tasks=["linear_probe"])


def test_untagged_split_skips_zeroshot_in_training_eval(setup, tmp_path):
    from clapscale.eval.zeroshot import NoLabelsError

    records = [{**r, "tag": []} for r in generate("valid", 2, seed=6)]
    write_shards(records, tmp_path, "valid", shard_size=2)
    cfg = dataclasses.replace(setup["cfg"], data=dataclasses.replace(setup["cfg"].data, val=str(tmp_path / "valid" / "000000.tar")))
    with pytest.raises(NoLabelsError, match="no `tag`"):
        evaluate_tasks(setup["model"], cfg, rank=0, world_size=1, device="cpu")
    # The trainer's entry point keeps going with what can be evaluated.
    flat = evaluate(setup["model"], cfg, rank=0, world_size=1, device="cpu")
    assert "retrieval/t2a/R@1" in flat and not any(k.startswith("zeroshot/") for k in flat)
