"""Training throughput, memory and loss scaling for the tiny recipe.

    .venv/bin/python benchmarks/bench_train.py [--steps 8] [--shards DIR]

Prints, measured in this one run:
1. samples/s and peak memory per rank (max RSS on CPU, max allocated on CUDA) of
   `clapscale train configs/tiny.yaml` with 1 and 2 ranks (torchrun, gloo on CPU), steady state
   (the first two steps are warm-up and left out);
2. the contrastive loss's peak memory per rank (bytes the autograd graph keeps for backward plus
   the logits) as the global batch N grows with the number of ranks at a fixed per-rank batch b:
   local loss (b x N logits) against the full loss (N x N);
3. on a GPU, model FLOPs utilisation: (forward + backward FLOPs per sample, counted by
   torch.utils.flop_counter) x samples/s / the device's peak (--peak-tflops).

With ``--recipes`` it runs instead the cluster recipes, each in its own single-rank process, as
benchmarks/gpu_suite.sh does on a GPU:

    .venv/bin/python benchmarks/bench_train.py --recipes htsat-tiny-roberta,htsat-base-roberta,cnn14-bert,vit-b32-clip
        [--steps 10] [--recipe-batch 0] [--text-tokens 32] [--json out.json]

4. per recipe (random init, bf16, ZeRO-1, one device, the recipe's per-rank batch unless
   --recipe-batch): samples/s of the training step on one in-memory batch (log-mel on the device,
   forward, loss, backward, optimizer step; the loader is benchmarks/bench_loader.py's business),
   peak memory, FLOPs per sample and MFU against the device's data-sheet bf16 peak. BERT / RoBERTa
   towers are built from an architecture config (no vocabulary offline): token ids are random,
   --text-tokens per caption (padding to the longest caption of a batch; CLIP always uses 77).
   A name ``RECIPE+VARIANT[+...]`` adds speed switches to the recipe (``VARIANTS``: sdpa, tf32,
   compile, ckpt, channels_last), e.g. ``htsat-base-roberta+sdpa+compile+tf32``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("DS_ACCELERATOR", "cpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ 1. throughput


def _worker(out: str, overrides: list[str]) -> None:
    """Runs on every rank under torchrun: train, then record this rank's peak memory."""
    import torch

    from clapscale.config import load_config
    from clapscale.train.loop import Trainer

    trainer = Trainer(load_config(REPO / "configs" / "tiny.yaml", overrides))
    trainer.train()
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(out, f"rank{trainer.denv.rank}.json").write_text(json.dumps(peak))


def throughput(nproc: int, shards: str, steps: int, batch: int, out_root: Path, threads: int) -> dict:
    out = out_root / f"ranks{nproc}"
    out.mkdir(parents=True)
    overrides = [f"data.train={shards}", "data.val=", f"train.out_dir={out}", f"train.steps={steps}",
                 "train.log_every=1", "train.checkpoint_every=0", "train.eval_every=-1",
                 f"data.batch_size={batch}", "data.resampled=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", str(out), *overrides]
    env = _env()
    env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=1800, capture_output=True)
    records = [json.loads(x) for x in (out / "tiny" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > 2]
    peaks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {"ranks": nproc, "samples_per_s": statistics.median(rates), "peak_per_rank": peaks}


# ------------------------------------------------------------------------------ 2. loss memory


def _loss_memory_worker(rank: int, world: int, port: int, b: int, d: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from clapscale.losses import ClipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    for local in (True, False):
        torch.manual_seed(rank)
        a = F.normalize(torch.randn(b, d), dim=-1).requires_grad_(True)
        t = F.normalize(torch.randn(b, d), dim=-1).requires_grad_(True)
        n = b * world
        saved: dict[int, int] = {}

        def pack(x):
            # Only what the logits cost: (rows x N) tensors. The features (b x D local, N x D
            # gathered) are the same for both losses and are left out (D differs from b and N).
            if x.dim() == 2 and tuple(x.shape) in ((b, n), (n, n)):
                saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = ClipLoss(rank=rank, world_size=world, local_loss=local)(a, t, torch.tensor(10.0))
        loss.backward()
        result["local" if local else "full"] = sum(saved.values())
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def loss_memory(worlds: list[int], b: int, d: int) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    for world in worlds:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            mp.start_processes(_loss_memory_worker, args=(world, _free_port(), b, d, f.name), nprocs=world,
                               start_method="spawn", join=True)
            res = json.loads(Path(f.name).read_text())
        n = b * world
        rows.append({"world": world, "N": n, "local_bytes": res["local"], "full_bytes": res["full"],
                     "local_per_bN": res["local"] / (b * n * 4), "full_per_N2": res["full"] / (n * n * 4)})
    return rows


# ------------------------------------------------------------------------------ 3. FLOPs / MFU


def flops_per_sample(batch: int) -> float:
    """Forward + backward FLOPs of the tiny ClapModel per sample (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clapscale.config import load_config
    from clapscale.models import build_model, build_tokenizer

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    model = build_model(cfg).train()
    tok = build_tokenizer(cfg.model.text)(["a dog barks in the distance"] * batch)
    mel = torch.randn(batch, 1, cfg.audio.n_frames, cfg.audio.n_mels)
    counter = FlopCounterMode(display=False)
    with counter:
        a, t, s = model(mel, torch.zeros(batch, dtype=torch.bool), tok["input_ids"], tok["attention_mask"])
        (a.sum() + t.sum() + s).backward()
    return counter.get_total_flops() / batch

# ------------------------------------------------------------------------------ 4. cluster recipes


@dataclass(frozen=True)
class Recipe:
    """A cluster recipe as benchmarked: its YAML, overrides, and the size of its random-init text tower."""

    config: str
    overrides: tuple[str, ...]
    text_size: str  # "base" (BERT / RoBERTa-base shapes) or "tiny" (the CPU smoke test)


# Every recipe runs as shipped except: random init (no weights offline), bf16, ZeRO-1 (one GPU).
RECIPES: dict[str, Recipe] = {
    "htsat-tiny-roberta": Recipe("htsat-roberta.yaml", (), "base"),
    "htsat-base-roberta": Recipe("htsat-roberta.yaml", ("model.audio.size=base",), "base"),
    "cnn14-bert": Recipe("cnn14-bert.yaml", (), "base"),
    "vit-b32-clip": Recipe("vit-clip.yaml", (), "base"),
    # CPU-sized (2 s clips, the tiny CNN, a 2-layer RoBERTa-shaped text tower), so the suite's reduced mode
    # goes through the same random-init-from-config path as the real recipes.
    "smoke": Recipe("tiny.yaml", ("model.text.name=roberta", "audio.clip_seconds=2"), "tiny"),
}

# Speed switches a recipe name can add as ``RECIPE+VARIANT[+VARIANT...]`` (e.g. htsat-base-roberta+sdpa),
# each measured against the recipe as shipped (tests/test_models_speed.py checks their outputs).
VARIANTS: dict[str, tuple[str, ...]] = {
    "sdpa": ("model.audio.attention=sdpa",),
    "tf32": ("train.tf32=true",),
    "compile": ("train.compile=inductor",),
    "ckpt": ("model.audio.grad_checkpointing=true", "model.text.grad_checkpointing=true"),
    "channels_last": ("model.audio.channels_last=true",),
}


def recipe_of(name: str) -> Recipe | None:
    """The recipe ``NAME[+VARIANT...]`` names (its overrides extended by the variants'), or None."""
    base, *variants = name.split("+")
    if base not in RECIPES or any(v not in VARIANTS for v in variants):
        return None
    r = RECIPES[base]
    return Recipe(r.config, (*r.overrides, *(o for v in variants for o in VARIANTS[v])), r.text_size)


# Peak dense bf16 tensor throughput (TFLOP/s) by device name, from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def write_text_config(name: str, size: str, out: Path) -> Path:
    """A transformers ``config.json`` for a randomly initialised BERT / RoBERTa tower in ``out``.

    No vocabulary or weights exist offline, so the recipes' ``model.text.path`` (a hub name) is
    replaced by a directory holding only the architecture: bert-base-uncased / roberta-base shapes,
    or a 2-layer 64-wide one for the CPU smoke run.
    """
    from transformers import BertConfig, RobertaConfig

    dims = {} if size == "base" else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=128)
    if name == "roberta":
        # roberta-base's own values where they differ from BertConfig's defaults.
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **dims)
    elif name == "bert":
        config = BertConfig(**dims)
    else:
        raise ValueError(f"no random-init config for text tower {name!r}")
    config.save_pretrained(out)
    return out


def _synthetic_batch(cfg, batch: int, tokens: int, device) -> dict:
    """Loader-shaped batch (``clapscale.features.AudioFrontend`` input) plus token ids, on ``device``.

    Token ids avoid the special ids (RoBERTa derives positions from ``input_ids != pad``); CLIP's
    tower pools at the largest id, so its row ends with the end-of-text token.
    """
    import torch

    from clapscale.models.text import CLIP_TEXT, MAX_TOKENS

    g = torch.Generator().manual_seed(0)
    if cfg.model.text.name == "clip":
        tokens = MAX_TOKENS
        ids = torch.randint(1, CLIP_TEXT["vocab_size"] - 2, (batch, tokens), generator=g)
        ids[:, -1] = CLIP_TEXT["vocab_size"] - 1
    else:
        ids = torch.randint(3, 30000, (batch, tokens), generator=g)
    wave = 0.1 * torch.randn(batch, cfg.audio.clip_samples, generator=g)
    return {
        "waveform": wave.to(device),
        "is_longer": torch.zeros(batch, dtype=torch.bool, device=device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
    }


def _recipe_worker(name: str, out: str, steps: int, batch: int, tokens: int, peak_tflops: float) -> None:
    """One recipe in this process (single rank): build the engine, time training steps, write JSON.

    The step is the trainer's (``clapscale.train.loop``): log-mel on the device, the engine's
    forward in the compute dtype, the contrastive loss in fp32, ``engine.backward``, ``engine.step``,
    on one fixed in-memory batch, so the figures are the model's, not the loader's.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clapscale.config import load_config
    from clapscale.features import AudioFrontend
    from clapscale.losses import build_loss
    from clapscale.models import build_model
    from clapscale.train import engine as engines
    from clapscale.train.distributed import device_for, discover, init_process_group

    recipe = recipe_of(name)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*recipe.overrides, "train.precision=bf16", "train.zero_stage=1", "model.audio.pretrained="]
        if batch:
            overrides.append(f"data.batch_size={batch}")
        cfg = load_config(REPO / "configs" / recipe.config, overrides)
        if cfg.model.text.name in ("bert", "roberta"):
            text_dir = write_text_config(cfg.model.text.name, recipe.text_size, Path(tmp) / "text")
            cfg = load_config(REPO / "configs" / recipe.config,
                              [*overrides, f"model.text.path={text_dir}", "model.text.pretrained=false"])
        else:
            cfg = load_config(REPO / "configs" / recipe.config, [*overrides, "model.text.pretrained=false"])
        denv = discover()
        engines.init_distributed(init_process_group(denv, cfg.train.dist_timeout_s))
        device = device_for(denv)
        torch.manual_seed(0)
        model = build_model(cfg)
        params = sum(p.numel() for p in model.parameters())
        frontend = AudioFrontend(cfg.audio).to(device)
        loss_fn = build_loss(cfg.loss)
        engine = engines.build_engine(model, cfg, 1, device)
        dtype = engines.compute_dtype(cfg)
        b = cfg.data.batch_size
        data = _synthetic_batch(cfg, b, tokens, device)
        flops = {"fwd": 0, "bwd": 0}

        def step(count: bool = False) -> float:
            with torch.no_grad():
                mel, is_longer = frontend(data)
            fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with fwd if count else contextlib.nullcontext():
                audio, text, scale = engine(mel.to(dtype), is_longer, data["input_ids"], data["attention_mask"])
                loss = loss_fn(audio.float(), text.float(), scale.float())
            with bwd if count else contextlib.nullcontext():
                engine.backward(loss)
            engine.step()
            if count:
                flops.update(fwd=fwd.get_total_flops(), bwd=bwd.get_total_flops())
            return float(loss)

        cuda = device.type == "cuda"
        step(count=True)
        step()  # the first steps allocate and autotune: left out
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step() for _ in range(steps)]  # float(loss) syncs every step, as the trainer's logging does
        elapsed = time.perf_counter() - t0
    sps = b * steps / elapsed
    fwd, bwd = flops["fwd"] / b, flops["bwd"] / b
    record = {
        "recipe": name, "config": f"configs/{recipe.config}", "overrides": overrides,
        "audio": f"{cfg.model.audio.name}-{cfg.model.audio.size}", "text": f"{cfg.model.text.name}-{recipe.text_size}",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "batch": b,
        "text_tokens": int(data["input_ids"].shape[1]), "steps": steps, "params": params,
        "samples_per_s": sps, "step_ms": 1000 * elapsed / steps,
        "peak_mem_mib": (torch.cuda.max_memory_allocated(device) if cuda
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "peak_mem_kind": "cuda_max_allocated" if cuda else "max_rss",
        "fwd_gflop_per_sample": fwd / 1e9, "bwd_gflop_per_sample": bwd / 1e9,
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_tflops": peak_tflops or None, "mfu": None, "hfu": None,
    }
    if peak_tflops:
        # MFU counts model FLOPs (backward = 2 x forward, the usual convention) so recomputation under
        # activation checkpointing does not count; HFU counts what the device actually executed.
        record["mfu"] = 3 * fwd * sps / (peak_tflops * 1e12)
        record["hfu"] = (fwd + bwd) * sps / (peak_tflops * 1e12)
    Path(out).write_text(json.dumps(record))


def device_peak_tflops(given: float) -> float:
    """``given`` if set, else the data-sheet bf16 peak of the CUDA device by name; 0 when unknown (CPU)."""
    import torch

    if given:
        return given
    if not torch.cuda.is_available():
        return 0.0
    gpu = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), 0.0)


def recipes(names: list[str], steps: int, batch: int, tokens: int, peak_tflops: float, timeout: float,
            json_out: str = "") -> list[dict]:
    """Benchmark each recipe in its own single-rank process (peak memory per recipe; one failing,
    e.g. out of memory, is recorded and the next one runs). ``json_out`` is rewritten after every
    recipe, so a caller's timeout keeps the recipes already measured."""
    rows: list[dict] = []
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            env = _env()
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe-worker", name, "--json", f.name,
                   "--steps", str(steps), "--recipe-batch", str(batch), "--text-tokens", str(tokens),
                   "--peak-tflops", str(peak_tflops)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
                error = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip().splitlines()[-20:]
            except subprocess.TimeoutExpired:
                error = [f"timed out after {timeout:g} s"]
            wall = time.perf_counter() - t0
            if error is None:
                rows.append({**json.loads(Path(f.name).read_text()), "status": "ok", "wall_s": wall})
            else:
                rows.append({"recipe": name, "status": "failed", "wall_s": wall, "error": "\n".join(error)})
            if json_out:
                partial = Path(f"{json_out}.partial")
                partial.write_text(json.dumps({"recipes": rows}, indent=1))
                partial.replace(json_out)
    return rows


def print_recipes(rows: list[dict]) -> None:
    print(f"{'recipe':<36} {'batch':>5} {'samples/s':>10} {'step ms':>8} {'peak MiB':>9} "
          f"{'GFLOP/sample':>12} {'MFU':>6}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['recipe']:<36} FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['recipe']:<36} {r['batch']:>5} {r['samples_per_s']:>10.1f} {r['step_ms']:>8.1f} "
              f"{r['peak_mem_mib']:>9.0f} {3 * r['fwd_gflop_per_sample']:>12.1f} {mfu:>6}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch")
    p.add_argument("--shards", default="", help="a shard spec; default: make 160 synthetic clips")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank (same for 1 and 2 ranks)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="device peak TFLOP/s; default: the device's bf16 data-sheet figure by name "
                   "(H100/H200 SXM: 989; none on CPU, where no MFU is given)")
    p.add_argument("--recipes", default="", help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--recipe-batch", type=int, default=0, help="per-rank batch for --recipes; 0 = the recipe's")
    p.add_argument("--text-tokens", type=int, default=32, help="tokens per caption for --recipes (BERT/RoBERTa)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per recipe before it is recorded as failed")
    p.add_argument("--json", default="", help="with --recipes: write the figures here")
    p.add_argument("--recipe-worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        _worker(args.worker, rest)
        return 0
    if args.recipe_worker:
        _recipe_worker(args.recipe_worker, args.json, args.steps, args.recipe_batch, args.text_tokens,
                       args.peak_tflops)
        return 0
    if args.recipes:
        names = args.recipes.split(",")
        unknown = [n for n in names if recipe_of(n) is None]
        if unknown:
            p.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}, each "
                    f"optionally +{'+'.join(VARIANTS)}")
        rows = recipes(names, args.steps, args.recipe_batch, args.text_tokens,
                       device_peak_tflops(args.peak_tflops), args.timeout, args.json)
        print_recipes(rows)
        return 0 if all(r["status"] == "ok" for r in rows) else 1
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = args.shards
        if not shards:
            subprocess.run([sys.executable, "tools/make_shards.py", "--synthetic", "160", "--out", str(tmp / "s"),
                            "--shard-size", "32", "--quiet"], cwd=REPO, env=_env(), check=True)
            n = len(list((tmp / "s" / "train").glob("*.tar")))
            shards = f"{tmp}/s/train/{{000000..{n - 1:06d}}}.tar"
        print(f"# 1. tiny config, {args.steps} steps, batch {args.batch} per rank, "
              f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, {os.cpu_count()} cores, "
              f"{args.threads} thread(s) per rank")
        runs = [throughput(n, shards, args.steps, args.batch, tmp / "runs", args.threads) for n in (1, 2)]
        for r in runs:
            peaks = ", ".join(
                f"rank{i}: {pk['rss_mib']:.0f} MiB RSS" + (f" / {pk['cuda_mib']:.0f} MiB CUDA" if "cuda_mib" in pk else "")
                for i, pk in enumerate(r["peak_per_rank"]))
            print(f"ranks={r['ranks']}  samples/s={r['samples_per_s']:.2f}  peak {peaks}")
        print(f"2-rank / 1-rank throughput: {runs[1]['samples_per_s'] / runs[0]['samples_per_s']:.2f}x")

    print("\n# 2. loss memory per rank: bytes the autograd graph keeps for the logits, b=256 per rank, D=96")
    rows = loss_memory([1, 2, 4], 256, 96)
    for r in rows:
        print(f"world={r['world']}  N={r['N']:5d}  local: {r['local_bytes'] / 2**20:7.2f} MiB "
              f"({r['local_per_bN']:.2f} x b*N*4B)   full: {r['full_bytes'] / 2**20:7.2f} MiB "
              f"({r['full_per_N2']:.2f} x N^2*4B)")
    print(f"local loss growth N={rows[0]['N']}->{rows[-1]['N']}: {rows[-1]['local_bytes'] / rows[0]['local_bytes']:.2f}x "
          f"(b*N grows {rows[-1]['N'] / rows[0]['N']:.0f}x, N^2 grows {(rows[-1]['N'] / rows[0]['N']) ** 2:.0f}x)")

    print("\n# 3. model FLOPs")
    fps = flops_per_sample(4)
    print(f"forward+backward: {fps / 1e9:.2f} GFLOP per sample (tiny)")
    peak = device_peak_tflops(args.peak_tflops)
    if peak:
        for r in runs:
            mfu = fps * r["samples_per_s"] / r["ranks"] / (peak * 1e12)
            print(f"ranks={r['ranks']}  MFU={100 * mfu:.2f}% of {peak} TFLOP/s per device")
    else:
        print("MFU: needs a CUDA device (not measured on CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
