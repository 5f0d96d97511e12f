"""A 7-B-shape OpenVLA-OFT with random bf16 weights on one GPU: memory and latency (vla_spec §5.2).

    bash benchmarks/gpu_check_vla.sh [--ppo] [--batches 1 2 4 8]
    .venv/bin/python benchmarks/gpu_check_vla.py --tiny --ppo     # CPU smoke test, same code

Nothing is downloaded: the model is built from the official shapes (DINOv2-L + SigLIP-SO400M,
a Llama-2-7B LLM with vocab 32064, OFT's L1 head and proprio projector, RIPT's scale head) on
the meta device, materialised on the GPU in bf16 and filled with random values (memory and time
do not depend on them). Prints the GPU, parameter counts, peak memory after load, the latency of
one OFT action chunk (batch 1/2/4/8) for the single full pass and for RIPT's prefix+suffix split,
and with --ppo one RIPT PPO micro-step per max_step_batch_size 1 and 2: LoRA r=32 α=16 on
OFT's all-linear targets (peft), no-grad prefix, suffix forward + backward through every layer,
both AdamW steps, with the peak memory of each. With --env-steps N, the OFT LIBERO runner
(`ript.vla.policy.VLAPolicy` on the real simulator, 256 px renders of both cameras) runs N steps
with 8 parallel envs and prints env steps/s (the policy's share of the time beside it).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ript.vla.fake import fake_config, randomise_  # noqa: E402
from ript.vla.prismatic import FAKE_OVERRIDES_FIELD  # noqa: E402
from ript.vla.heads import (L1RegressionActionHead, LaplaceScaleHead,  # noqa: E402
                            ProprioProjector)
from ript.vla.prismatic import PrismaticVLA, lora_target_modules  # noqa: E402

PROMPT_IDS = 32  # BOS + 31 prompt ids: RIPT's example prefix of 1 + 513 + 30 = 544 tokens (§4.3)


def config(tiny: bool) -> dict:
    cfg = fake_config("libero_spatial")
    if not tiny:  # the official 7-B shapes (§1.1)
        del cfg[FAKE_OVERRIDES_FIELD], cfg["ript_fake"]
        cfg["text_config"].update(hidden_size=4096, intermediate_size=11008,
                                  num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=32)
    return cfg


def build(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Meta-built modules, materialised on `device` in `dtype`, random values."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = PrismaticVLA(cfg)
            hidden = model.hidden_size
            heads = (L1RegressionActionHead(hidden), ProprioProjector(hidden),
                     LaplaceScaleHead(hidden))
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for module in (model, *heads):
        module = module.to_empty(device=device)
        randomise_(module, gen)
        out.append(module.eval())
    lm = out[0].language_model.model  # rotary tables are computed buffers, not weights
    lm.rotary_emb = type(lm.rotary_emb)(out[0].language_model.config).to(device)
    return out


def inputs(batch: int, device: torch.device, gen: torch.Generator):
    ids = torch.randint(3, 31000, (batch, PROMPT_IDS), generator=gen)
    ids[:, 0], ids[:, -1] = 1, 29871
    pix = torch.randn(batch, 12, 224, 224, generator=gen)
    return ids.to(device), pix.to(device), (torch.rand(batch, 8, generator=gen) * 2 - 1).to(device)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class Meter:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        return gib(torch.cuda.max_memory_allocated()) if self.cuda else "n/a (CPU)"

    def time(self, fn, reps: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:,.1f} M"


def chunk(model, head, proprio, ids, pix, state, mode):
    return head(model.action_hidden(ids, pix, state, proprio, mode=mode))


def ppo_step(model, head, scale, proprio, groups, ids, pix, state, actions, advantage):
    """One window of RIPT's loss (§4.2, §4.5) and both optimiser steps (§4.4)."""
    cache = model.prefix_cache(ids, pix, state, proprio)
    hidden = model.suffix_hidden(cache)
    mu, log_b = head(hidden).float(), scale(hidden).float().clamp(-2.0, 0.5)
    logp = (-log_b - (actions - mu).abs() / log_b.exp() - math.log(2)).sum(-1)
    ratio = (logp - logp.detach() + 0.01).exp()  # old log-probs ≈ new, as in a first epoch
    loss = torch.max(-advantage * ratio, -advantage * ratio.clamp(0.9, 1.1)).sum() / ratio.numel()
    loss.backward()
    for params, opt in groups:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def latency(model, head, proprio, batches, device, meter, reps):
    gen = torch.Generator().manual_seed(1)
    print("\nOFT action chunk (56 states + L1 head), median of", reps)
    print(f"{'batch':>5} {'full pass':>11} {'prefix+suffix':>14} {'peak memory':>12}")
    for b in batches:
        ids, pix, state = inputs(b, device, gen)
        meter.reset()
        with torch.inference_mode():
            full, split = (meter.time(functools.partial(chunk, model, head, proprio, ids, pix,
                                                        state, mode), reps)
                           for mode in ("full", "prefix"))
        print(f"{b:>5} {full * 1e3:>9.1f}ms {split * 1e3:>12.1f}ms {meter.peak():>12}")


def ppo(model, head, proprio, scale, device, meter, reps):
    """RIPT's micro-step (§4.3-4.5): LoRA on the VLA, no-grad prefix, suffix with gradient."""
    from peft import LoraConfig, get_peft_model

    meter.reset()
    get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0,
                                     init_lora_weights="gaussian",
                                     target_modules=lora_target_modules(model)))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in [*proprio.parameters(), *scale.parameters()]:  # frozen (fix_scale_head)
        p.requires_grad_(False)
    head.train()
    groups = [(lora, torch.optim.AdamW(lora, lr=5e-5, weight_decay=1e-4)),
              (list(head.parameters()),
               torch.optim.AdamW(head.parameters(), lr=5e-5, weight_decay=1e-4))]
    print(f"\nPPO micro-step: LoRA {sum(p.numel() for p in lora) / 1e6:,.1f} M parameters "
          f"({lora[0].dtype}), memory with LoRA {meter.peak()}")
    gen = torch.Generator().manual_seed(2)
    for msb in (1, 2):
        ids, pix, state = inputs(msb, device, gen)
        actions = (torch.rand(msb, 8, 7, generator=gen) * 2 - 1).to(device)
        advantage = torch.tensor([1.0, -1.0][:msb], device=device)[:, None]
        step = functools.partial(ppo_step, model, head, scale, proprio, groups, ids, pix, state,
                                 actions, advantage)
        meter.reset()
        t = meter.time(step, reps)
        print(f"max_step_batch_size {msb}: {t * 1e3:.1f} ms per micro-step + optimiser step, "
              f"peak memory {meter.peak()}")


def runner_speed(model, head, proprio, device, steps: int, n_envs: int = 8,
                 workers: int = 8) -> None:
    """Env steps/s of the OFT LIBERO runner with parallel envs, this model in the loop."""
    import tempfile

    from ript.envs.benchmark import get
    from ript.envs.libero import suite_tasks
    from ript.envs.worker import EpisodeContext
    from ript.vla.checkpoint import ImagePreprocessing, VLACheckpoint
    from ript.vla.fake import ACTION_STATS, PROPRIO_STATS
    from ript.vla.writer import write_tokenizer
    from ript.vla.policy import VLAPolicy

    from transformers import AutoTokenizer

    suite = "libero_spatial"
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    image = ImagePreprocessing(224, ((0.485, 0.456, 0.406), (0.5,) * 3),
                               ((0.229, 0.224, 0.225), (0.5,) * 3), "bicubic", "default")
    ckpt = VLACheckpoint(model, "openvla_oft", tokenizer,
                         {suite: {"action": ACTION_STATS, "proprio": PROPRIO_STATS}}, image,
                         head, proprio, Path("random-weights"), {}, None)
    bench = get("libero", suite)
    tasks = suite_tasks(suite)
    policy = VLAPolicy(ckpt, bench, tasks, suite)
    timed = {"s": 0.0}
    predict = policy.predict

    def timed_predict(*a, **k):
        t = time.perf_counter()
        out = predict(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed["s"] += time.perf_counter() - t
        return out

    policy.predict = timed_predict
    runner = bench.make_runner({"image": True, "image_size": 256, "vla": True}, n_envs,
                               workers, max_episode_steps=steps, step_timeout_s=600)
    contexts = [EpisodeContext(i, tasks[0], i, i) for i in range(n_envs)]
    with runner:
        runner.run(policy, contexts, seed=0)  # warm-up: builds the envs (LIBERO: seconds each)
        runner.env_steps, timed["s"] = 0, 0.0
        t = time.perf_counter()
        runner.run(policy, contexts, seed=0)
        wall = time.perf_counter() - t
    print(f"\nOFT LIBERO runner, {n_envs} envs on {workers} workers, {steps} steps each: "
          f"{runner.env_steps / wall:.1f} env steps/s (policy {100 * timed['s'] / wall:.0f} % "
          f"of {wall:.1f} s, incl. resets of cached envs)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny fake shapes (CPU smoke test)")
    p.add_argument("--ppo", action="store_true", help="also time a RIPT PPO micro-step")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--env-steps", type=int, default=0,
                   help="also run the OFT LIBERO runner this many steps per env (8 envs)")
    p.add_argument("--env-workers", type=int, default=8)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meter = Meter(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; "
          f"{'tiny fake' if args.tiny else '7-B'} shapes, random weights")
    meter.reset()
    t = time.perf_counter()
    model, head, proprio, scale = build(config(args.tiny), device, dtype)
    meter.sync()
    print(f"built in {time.perf_counter() - t:.1f} s; parameters: vision "
          f"{count(model.vision_backbone)}, projector {count(model.projector)}, LLM "
          f"{count(model.language_model)}, L1 head {count(head)}, proprio {count(proprio)}, "
          f"scale head {count(scale)}")
    print(f"peak memory after load: {meter.peak()}")
    latency(model, head, proprio, args.batches, device, meter, args.reps)
    if args.ppo:
        ppo(model, head, proprio, scale, device, meter, args.reps)
    else:
        print("\nPPO micro-step: skipped (pass --ppo)")
    if args.env_steps:
        runner_speed(model, head, proprio, device, args.env_steps, workers=args.env_workers)


if __name__ == "__main__":
    main()
