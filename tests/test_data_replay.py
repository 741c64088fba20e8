"""Replay (``data.replay``) on real shards through the real wds loader:

- the share of replayed batches matches the probability (binomial tolerance, closed form), each
  batch comes wholly from one set, and the replayed positions are those ``replay_draw`` names;
- a loader restored from a saved position continues identically (training and replay batches);
- the config refuses half a replay setting and the DALI backend, naming the field.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clapscale.config import ConfigError, load_config
from clapscale.data import build_loader
from clapscale.data.replay import ReplayLoader, replay_draw
from clapscale.shards.writer import write_shards

PROB = 0.3


def _records(prefix: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"key": f"{prefix}-{i:04d}", "audio": (0.1 * rng.standard_normal(4800)).astype(np.float32),
               "text": [f"{prefix} sound {i}"], "tag": []}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    write_shards(_records("main", 24, 0), root / "main", "train", shard_size=6)
    write_shards(_records("rep", 10, 1), root / "rep", "train", shard_size=5)
    return f"{root}/main/train/{{000000..000003}}.tar", f"{root}/rep/train/{{000000..000001}}.tar"


def _cfg(specs, *extra):
    main, rep = specs
    return load_config(None, [f"data.train={main}", f"data.replay.spec={rep}", f"data.replay.prob={PROB}",
                              "data.batch_size=2", "data.workers=0", "data.shuffle_buffer=4", "data.resampled=false",
                              "audio.length_policy=pad", "audio.clip_seconds=0.1", "audio.max_seconds=1",
                              *extra])


def _take(loader, n):
    out = []
    while len(out) < n:  # a pass ends with the training set's epoch; the trainer starts the next
        for batch in loader:
            out.append(list(batch["keys"]))
            if len(out) == n:
                break
    return out


def test_draw_rate_matches_probability():
    n = 20000
    k = sum(replay_draw(7, i, PROB) for i in range(n))
    assert abs(k - n * PROB) <= 4 * math.sqrt(n * PROB * (1 - PROB))
    assert replay_draw(7, 123, PROB) == replay_draw(7, 123, PROB)
    assert [replay_draw(7, i, PROB) for i in range(50)] != [replay_draw(8, i, PROB) for i in range(50)]


def test_replay_rate_and_purity_through_the_loader(specs):
    loader = build_loader(_cfg(specs), _cfg(specs).data.train)
    assert isinstance(loader, ReplayLoader)
    n = 160
    batches = _take(loader, n)
    kinds = []
    for keys in batches:
        sources = {k.split("-")[0] for k in keys}
        assert len(sources) == 1, f"a batch mixes the sets: {keys}"
        kinds.append(sources.pop() == "rep")
    # Exactly the positions the seeded draw names, and their count is binomial(n, PROB).
    assert kinds == [replay_draw(0, i, PROB) for i in range(n)]
    k = sum(kinds)
    assert abs(k - n * PROB) <= 4 * math.sqrt(n * PROB * (1 - PROB)), k
    assert loader.replayed == k and loader.position == n
    # A replayed batch consumes no training batch: each epoch (12 batches) still holds every key once.
    main_keys = [key for keys, rep in zip(batches, kinds) if not rep for key in keys]
    assert sorted(main_keys[:24]) == sorted(f"main-{i:04d}" for i in range(24))


def test_resumed_loader_continues_identically(specs):
    cfg = _cfg(specs)
    full = _take(build_loader(cfg, cfg.data.train), 40)
    first = build_loader(cfg, cfg.data.train)
    head = _take(first, 17)
    state = first.state_dict()
    resumed = build_loader(cfg, cfg.data.train)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 23) == full
    assert any(k[0].startswith("rep") for k in full[17:]) and any(k[0].startswith("main") for k in full[17:])


def test_config_refuses_half_a_replay_and_dali(specs):
    main, rep = specs
    with pytest.raises(ConfigError, match="data.replay.prob"):
        load_config(None, [f"data.train={main}", f"data.replay.spec={rep}"])
    with pytest.raises(ConfigError, match=r"data.replay.prob must be in \[0, 1\)"):
        load_config(None, [f"data.train={main}", f"data.replay.spec={rep}", "data.replay.prob=1.0"])
    with pytest.raises(ConfigError, match="data.replay is not supported with data.backend=dali"):
        load_config(None, [f"data.train={main}", f"data.replay.spec={rep}", "data.replay.prob=0.2",
                           "data.backend=dali"])
    with pytest.raises(ValueError, match="without data.replay"):
        build_loader(_cfg(specs), main).load_state_dict(build_loader(_cfg(specs, "data.replay.spec=",
                                                                           "data.replay.prob=0"), main).state_dict())
