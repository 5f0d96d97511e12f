"""The supervised training loop shared by QueST stages 0-2: AdamW, cosine schedule, grad clip,
exact resume, NaN guard, JSONL + MLflow metrics, tqdm progress."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ript.settings import OptimConfig
from ript.train import checkpoint as ckpt
from ript.utils import progress


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory so far in MiB (benchmarks/gpu_check.py reads it); nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"gpu_mem_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}


# Modules whose weights never decay in QueST's `separate_no_decay` (spec §3.5).
_NO_DECAY_MODULES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding,
                     torch.nn.modules.batchnorm._BatchNorm)


def decay_groups(module: torch.nn.Module, named_params, weight_decay: float,
                 mode: str = "linear") -> list[dict]:
    """AdamW groups (spec §3.5) over ``named_params`` (those of ``module`` to optimise).

    mode "linear": decay on Linear/Conv weights only. "all_weights": as QueST, every parameter
    named ``*weight`` that is not a norm's or an embedding's, which adds nn.MultiheadAttention's
    ``in_proj_weight`` (the autoencoder's attention); the two agree on the prior and the
    observation encoders. Biases, norms and embeddings never decay.
    """
    if mode == "linear":
        decay_ids = {id(m.weight) for m in module.modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))}
    elif mode == "all_weights":
        decay_ids = {id(p) for m in module.modules() if not isinstance(m, _NO_DECAY_MODULES)
                     for n, p in m.named_parameters(recurse=False) if n.endswith("weight")}
    else:
        raise ValueError(f"decay mode must be 'linear' or 'all_weights', got {mode!r}")
    decay = [p for _, p in named_params if id(p) in decay_ids]
    other = [p for _, p in named_params if id(p) not in decay_ids]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": other, "weight_decay": 0.0}]


class EpochBatches(torch.utils.data.Sampler):
    """Batches of shuffled indices, a fresh permutation per epoch derived from (seed, epoch),
    so the batch of any step can be rebuilt after a resume without replaying the others."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int):
        self.n, self.bs, self.seed = n, min(batch_size, n), seed
        self.per_epoch = math.ceil(n / self.bs)
        self.start, self.total = start_step, total_steps

    def __iter__(self):
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            yield perm[pos * self.bs:(pos + 1) * self.bs].tolist()

    def __len__(self):
        return self.total - self.start


def cosine(step: int, cfg: OptimConfig) -> float:
    """LR multiplier: cosine from lr to lr_min over all steps."""
    t = min(step / max(cfg.steps, 1), 1.0)
    return (cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))) / cfg.lr


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def train_loop(model, loss_fn, groups, dataset: Dataset, cfg: OptimConfig, tracker, *,
               ckpt_dir: Path, resume: dict | None, resume_key: dict, seed: int,
               device: torch.device, config: dict, evaluate=None) -> dict:
    """Train `model` for cfg.steps; resumable from `resume` (a ckpt/latest.pt payload).

    evaluate: `step -> {"val_success": ..., ...}`, called every cfg.eval_every steps and at the
    last; its metrics join that step's record. It runs with the RNG states saved and restored,
    so training draws the same numbers with and without it. With cfg.select ==
    "best_validation" the model ends holding the weights of the best evaluation (ties: the
    earlier step), and the resume checkpoint carries that best-so-far state.
    """
    if len(dataset) == 0:
        raise ValueError("empty dataset: no training windows")
    if cfg.epochs is not None:
        batches = math.ceil(len(dataset) / min(cfg.batch_size, len(dataset)))
        cfg = dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * batches)))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, cfg))
    step, best = 0, None
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        ckpt.set_rng_state(resume["rng"])
        step = resume["step"]
        best = resume.get("best")
        tracker.truncate_after(step)
        print(f"{tracker.stage}: resuming from step {step} of {cfg.steps}", flush=True)
    params = [p for g in groups for p in g["params"]]
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name()}"
                         "; use fp32")

    def save_state():
        ckpt.save(ckpt_dir / "latest.pt", {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": ckpt.rng_state(), "step": step,
            "config": config, "resume_key": resume_key, "mlflow_run_id": tracker.run_id,
            "best": best})

    loader = DataLoader(dataset, batch_sampler=EpochBatches(len(dataset), cfg.batch_size, seed,
                                                            step, cfg.steps),
                        num_workers=cfg.num_workers, persistent_workers=False,
                        # its own generator: creating the iterator must not draw from the
                        # global RNG, or a resumed run's dropout masks would shift
                        generator=torch.Generator().manual_seed(seed))
    bar = progress(total=cfg.steps, initial=step, desc=tracker.stage)
    last, val = {}, {}
    validate = evaluate is not None and cfg.eval_every > 0
    for batch in loader:
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, metrics = loss_fn(_to(batch, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {step}; the last good checkpoint is "
                f"kept in {ckpt_dir / 'latest.pt'} - lower the learning rate and re-run")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        last = {**metrics, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                **gpu_memory(device)}
        evaluated = validate and (step % cfg.eval_every == 0 or step == cfg.steps)
        if evaluated:
            val = _isolated_rng(evaluate, step, device)
            if cfg.select == "best_validation":
                if best is None or val["val_success"] > best["val_success"]:
                    best = {"step": step, "val_success": val["val_success"],
                            "state_dict": {k: v.detach().cpu().clone()
                                           for k, v in model.state_dict().items()}}
                val["selected_step"] = best["step"]
        if evaluated or step % cfg.log_every == 0 or step == cfg.steps:
            tracker.log_metrics({**last, **val} if evaluated else last, step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if bar.disable:  # logs and batch jobs still get a heartbeat
                print(f"{tracker.stage} step {step}/{cfg.steps} loss {metrics['loss']:.4f}",
                      flush=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_state()
    bar.close()
    if best is not None and cfg.select == "best_validation":
        model.load_state_dict(best["state_dict"])
    return {"steps": step, **last, **val}


def _isolated_rng(fn, step: int, device: torch.device) -> dict:
    """fn(step) with every RNG state (torch CPU/CUDA, numpy, python) restored afterwards, so an
    evaluation never shifts the training stream (dropout masks, augmentation)."""
    state = ckpt.rng_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = fn(step)
    ckpt.set_rng_state(state)
    return dict(out)
