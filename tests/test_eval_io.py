"""Evaluation I/O on 2 gloo ranks: the trainer's evaluation path (``evaluate_tasks`` with the real
model and shards) reads each validation shard about once in total, not once per rank, and still
gives the single-process result. Bytes are the kernel's count of what each rank's loader read
(``/proc/self/io`` around each batch; ``data.workers=0`` so the reads happen in the rank itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clapscale.eval.runner import evaluate_tasks
from test_eval_gather import run_two_ranks
from test_eval_runner import setup  # noqa: F401 - module fixture: tiny model + 7 clips in 3 shards

_MEASURE = '''
def rchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

read = [0]

def measured(loader):
    it = iter(loader)
    while True:
        before = rchar()
        batch = next(it, None)
        read[0] += rchar() - before
        if batch is None:
            return
        yield batch
'''

_EVAL_ON_TWO_RANKS = _MEASURE + '''
import dataclasses, json, sys
import torch, torch.distributed as dist
from clapscale.data import build_loader
from clapscale.eval.runner import evaluate_tasks
from clapscale.models import load_model
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model, cfg = load_model(sys.argv[1])
cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=sys.argv[2], workers=0, batch_size=3))
results = evaluate_tasks(model, cfg, rank=rank, world_size=2, device="cpu", tasks=["retrieval"],
                         loader_factory=lambda spec: measured(build_loader(cfg, spec, rank=rank, world_size=2, train=False)))
print(json.dumps({"read": read[0], "results": [r.to_dict() for r in results]}))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_ranks_read_the_split_once_in_total(setup):  # noqa: F811 - the imported fixture
    import dataclasses

    from clapscale.data import build_loader

    scope: dict = {}
    exec(_MEASURE, scope)  # the same measurement in this process, for the single-process reference
    cfg = setup["cfg"]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=0, batch_size=3))
    single = evaluate_tasks(setup["model"], cfg, rank=0, world_size=1, device="cpu", tasks=["retrieval"],
                            loader_factory=lambda spec: scope["measured"](build_loader(cfg, spec, train=False)))
    one_rank_read = scope["read"][0]
    data_bytes = sum(p.stat().st_size for p in Path(setup["spec"]).parent.glob("*.tar"))
    assert one_rank_read > 0.9 * data_bytes

    runs = run_two_ranks(_EVAL_ON_TWO_RANKS, [str(setup["root"] / "model"), setup["spec"]], timeout=180)
    assert all(rc == 0 for rc, _, _ in runs), runs[0][2][-2000:] + runs[1][2][-2000:]
    out = [json.loads(stdout.splitlines()[-1]) for _, stdout, _ in runs]
    assert out[0]["results"] == out[1]["results"]
    (got,) = out[0]["results"]
    assert got["info"] == single[0].info
    assert got["metrics"] == pytest.approx(single[0].metrics, abs=1e-6)
    reads = [o["read"] for o in out]
    # Each rank reads its own part (3 of 7 clips, 4 of 7), together about what one process reads.
    assert all(0 < r < 0.75 * one_rank_read for r in reads), reads
    assert sum(reads) <= 1.02 * one_rank_read, (reads, one_rank_read)


_TRAINER_EVAL_ON_TWO_RANKS = '''
import dataclasses, json, sys
import torch, torch.distributed as dist
from clapscale.eval.runner import evaluate_tasks
from clapscale.models import load_model
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model, cfg = load_model(sys.argv[1])
cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=sys.argv[2], backend=sys.argv[3], workers=0))
results = evaluate_tasks(model, cfg, rank=rank, world_size=2, device="cpu", tasks=["retrieval"])
print(json.dumps([r.to_dict() for r in results]))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_split_with_fewer_clips_than_ranks_evaluates_on_dali(setup):  # noqa: F811
    """A 1-clip validation split on 2 ranks, through the trainer's evaluation path with
    data.backend=dali: the rank without a clip reads nothing and both ranks report the one-process
    webdataset result (DALI refused such a split at loader construction, crashing the trainer's
    periodic eval). The loaders alone, both backends: test_data_common.py."""
    import dataclasses

    from clapscale.shards.synthetic import generate
    from clapscale.shards.writer import write_shards

    pytest.importorskip("nvidia.dali")
    root = setup["root"] / "one-clip"
    write_shards(generate("valid", 1, seed=11), root, "valid", shard_size=3)
    spec = str(root / "valid" / "000000.tar")
    cfg = setup["cfg"]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=spec, workers=0))
    (single,) = evaluate_tasks(setup["model"], cfg, rank=0, world_size=1, device="cpu", tasks=["retrieval"])
    assert single.info["clips"] == 1

    runs = run_two_ranks(_TRAINER_EVAL_ON_TWO_RANKS, [str(setup["root"] / "model"), spec, "dali"], timeout=180)
    assert all(rc == 0 for rc, _, _ in runs), runs[0][2][-2000:] + runs[1][2][-2000:]
    out = [json.loads(stdout.splitlines()[-1]) for _, stdout, _ in runs]
    assert out[0] == out[1]
    (got,) = out[0]
    assert got["info"] == single.info
    assert got["metrics"] == pytest.approx(single.metrics, abs=1e-6)
