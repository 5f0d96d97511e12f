"""Throughput / latency benchmark for ript.models on CPU.

Usage: python benchmarks/bench_models.py [--quick] [--threads N]
       python benchmarks/bench_models.py --against DIR [--rounds 3] [--precision fp32 bf16]
       python benchmarks/bench_models.py --profile {default,small,paper} {0,1} [--threads 1]

Prints training samples/s for stage 0 (autoencoder) and stage 1 (encoders + prior) and the
latency of sampling one 8-token chunk with and without the KV cache (spec §4.4, §9 item 8), at a
small CPU size and at the paper size (spec §3.1, §4.1, §4.2; low-dim obs + one 128 px camera).

With --against DIR (a checkout of another commit, e.g. `git worktree add /tmp/base <commit>`)
it times the training steps of this tree and of DIR side by side instead: each measurement in
a fresh process importing `ript` from one tree, the two trees alternating, --rounds times, and
prints the medians and their ratio (this machine's load drifts, so only same-run ratios count).
--precision bf16 adds this tree under bf16 autocast (`train.precision`) beside the fp32 rows.

--profile prints torch.profiler's busiest operators of a few training steps of one stage, at the
embedded default's size (`default`: config/config.yaml's models, 4-d MetaWorld actions, batch
128), the small CPU size or the paper size: where a step spends its time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ript.models import ObsEncoder, QuestPolicy, SkillGPT, SkillVAE

LOWDIM = {"joint_states": 7, "ee_pos": 3, "gripper_states": 2}
BATCH = {"default": 128, "small": 64, "paper": 32}  # training batch per model size


def iterations(quick: bool) -> dict[str, int]:
    """Timed training steps per model size."""
    return {"small": 3 if quick else 20, "paper": 2 if quick else 5}


def build(size: str) -> QuestPolicy:
    if size == "default":  # config/config.yaml's autoencoder and prior (MetaWorld: 4-d actions)
        vae = SkillVAE(4, d_model=64, enc_layers=2, dec_layers=2, heads=4, ffn=256)
        enc = ObsEncoder({"obs_gt": 39}, [], d_model=96, n_tasks=50)
        prior = SkillGPT(vae.vocab_size, vae.n_tokens, d_model=96, layers=3, heads=4, ffn=384)
    elif size == "small":
        vae = SkillVAE(7, d_model=128, enc_layers=2, dec_layers=2, heads=4, ffn=512)
        enc = ObsEncoder(LOWDIM, [], d_model=128, n_tasks=10)
        prior = SkillGPT(vae.vocab_size, vae.n_tokens, d_model=128, layers=4, heads=4, ffn=512)
    else:  # paper defaults
        vae = SkillVAE(7)
        enc = ObsEncoder(LOWDIM, ["agentview_rgb"], n_tasks=10, task_emb_dim=512)
        prior = SkillGPT(vae.vocab_size, vae.n_tokens)
    return QuestPolicy(vae, enc, prior)


def make_batch(policy: QuestPolicy, b: int) -> dict:
    enc = policy.obs_encoder
    obs = {k: torch.randn(b, d) for k, d in enc.lowdim_dims.items()}
    for k in enc.rgb_keys:
        obs[k] = torch.randint(0, 256, (b, 3, 128, 128), dtype=torch.uint8)
    a = policy.autoencoder.action_dim
    return {"actions": torch.rand(b, 32, a) * 2 - 1, "obs": obs,
            "task_id": torch.randint(0, 10, (b,))}


def train_rate(policy: QuestPolicy, stage: int, b: int, iters: int,
               precision: str = "fp32") -> float:
    policy.train()
    params = policy.trainable_parameters(stage)
    opt = torch.optim.AdamW(policy.param_groups(params, 1e-4), lr=1e-4)
    batch = make_batch(policy, b)

    def step():
        # as ript/train/loop.py does for train.precision: bf16
        amp = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
               else contextlib.nullcontext())
        with amp:
            loss, _ = policy.stage_loss(batch, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 100.0)
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return b * iters / (time.perf_counter() - t0)


def sample_latency_ms(policy: QuestPolicy, b: int, use_cache: bool, reps: int) -> float:
    policy.eval()
    ctx = torch.randn(b, 2, policy.prior.d_model)
    policy.prior.sample(ctx, use_cache=use_cache)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        policy.prior.sample(ctx, top_k=5, use_cache=use_cache)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def profile(size: str, stage: int, steps: int = 10) -> None:
    """torch.profiler's operator table of `steps` training steps (after two warm-up steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    policy = build(size)
    b = BATCH[size]
    train_rate(policy, stage, b, 2)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        rate = train_rate(policy, stage, b, steps)
    print(f"{size} size, stage {stage}, batch {b}, {torch.get_num_threads()} thread(s): "
          f"{rate:.1f} samples/s under the profiler ({1e3 * b / rate:.0f} ms per step)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def child_rate(size: str, stage: int, precision: str, iters: int) -> float:
    """One measurement in this process (the --child mode of --against)."""
    torch.manual_seed(0)
    return train_rate(build(size), stage, BATCH[size], iters, precision)


def side_by_side(args) -> None:
    """Training samples/s of this tree vs args.against, alternating fresh processes."""
    here = Path(__file__).resolve().parents[1]
    other = Path(args.against).resolve()
    if not (other / "ript" / "models").is_dir():
        raise SystemExit(f"--against {other}: not a checkout of this project (no ript/models)")
    iters = iterations(args.quick)
    arms = [("base", other, "fp32"), ("this", here, "fp32")]
    arms += [("this", here, p) for p in args.precision if p != "fp32"]
    rates: dict = {}
    for rnd in range(args.rounds):
        for size in ("small", "paper"):
            for stage in (0, 1):
                for name, tree, prec in arms:
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", size, str(stage), prec,
                         str(iters[size]), "--threads", str(args.threads)],
                        env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
                    rates.setdefault((size, stage, name, prec), []).append(float(out.split()[-1]))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {args.threads}, {args.rounds} rounds, 1-min load "
          f"avg {load:.1f} on {os.cpu_count()} CPUs; base = {other}")
    print(f"{'size':<6} {'stage':>5} {'arm':<10} {'samples/s (median)':>19} {'x base':>7}")
    for size in ("small", "paper"):
        for stage in (0, 1):
            base = statistics.median(rates[size, stage, "base", "fp32"])
            for name, _, prec in arms:
                r = statistics.median(rates[size, stage, name, prec])
                print(f"{size:<6} {stage:>5} {name + ' ' + prec:<10} {r:>19.1f} {r / base:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--against", help="a checkout of another commit to time side by side")
    ap.add_argument("--rounds", type=int, default=3, help="alternations with --against")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="with --against: precisions of this tree to time")
    ap.add_argument("--profile", nargs=2, metavar=("SIZE", "STAGE"),
                    help="torch.profiler table of one stage's steps: SIZE default|small|paper")
    ap.add_argument("--child", nargs=4, metavar=("SIZE", "STAGE", "PRECISION", "ITERS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        size, stage, prec, iters = args.child
        print(child_rate(size, int(stage), prec, int(iters)))
        return
    if args.against:
        side_by_side(args)
        return
    if args.profile:
        profile(args.profile[0], int(args.profile[1]))
        return
    torch.manual_seed(0)
    iters = iterations(args.quick)
    reps = 5 if args.quick else 30

    rows = []
    for size in ("small", "paper"):
        policy = build(size)
        n_par = sum(p.numel() for p in policy.parameters()) / 1e6
        r0 = train_rate(policy, 0, BATCH[size], iters[size])
        r1 = train_rate(policy, 1, BATCH[size], iters[size])
        lat = {(b, c): sample_latency_ms(policy, b, c, reps)
               for b in (1, 16) for c in (True, False)}
        rows.append((size, n_par, BATCH[size], r0, r1, lat))

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'quick' if args.quick else 'full'} run, 1-min load avg {load:.1f} on "
          f"{os.cpu_count()} CPUs (other processes distort the figures)")
    print(f"{'size':<6} {'params':>8} {'batch':>5} {'st0 samp/s':>10} {'st1 samp/s':>10} "
          f"{'b1 kv ms':>9} {'b1 nokv':>8} {'b16 kv':>7} {'b16 nokv':>8}")
    for size, n_par, b, r0, r1, lat in rows:
        print(f"{size:<6} {n_par:>7.1f}M {b:>5} {r0:>10.1f} {r1:>10.1f} "
              f"{lat[1, True]:>9.2f} {lat[1, False]:>8.2f} {lat[16, True]:>7.2f} "
              f"{lat[16, False]:>8.2f}")


if __name__ == "__main__":
    main()
