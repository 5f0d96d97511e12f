"""Stage 'scale_head': RIPT's Laplace scale head fitted to the demonstrations (vla_spec §4.1).

RIPT-VLA makes OFT's deterministic L1 head stochastic with a head that predicts log b per action
dimension; the original trained it on the SFT data with the policy frozen, but never released
that code (Ariostgx/ript-vla#3; the paper: 500 steps). This stage does it: the policy (VLA, L1
head, proprio projector) is frozen and run the way RIPT runs it (§4.3: the prefix without
gradient, then the action suffix), and a fresh scale head (bias −3, weights xavier gain 0.01)
learns to minimise the Laplace negative log-likelihood of the demonstrations' normalised chunks

    NLL = mean over samples and chunk steps of Σ_d [ log b + |a − μ|/b + ln 2 ],

μ the frozen L1 head's output, log b unclipped (the [−2, 0.5] clip is the PPO ratio's, §4.2;
inside it the clip would cut the gradient). Resumable like every stage (ript.train.loop); the
result is RIPT's released layout, {scale_trunk, log_b_head} (`scale_header.pth`).

    python -m ript.vla.scale_head --checkpoint results/x/checkpoint/manifest.json \
        --data results/x/data/*.hdf5 --benchmark metaworld --config '{...}' \
        --out results/x/scale_head/scale_header.pth --metrics metrics.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ript.config import from_dict, to_dict
from ript.envs.benchmark import get
from ript.vla.settings import ScaleHeadConfig
from ript.stage import add_common_args, code_hash, load_block, setup_threads, stage_tracker
from ript.train import checkpoint as ckpt
from ript.train.loop import decay_groups, train_loop
from ript.utils import seed_everything
from ript.vla.checkpoint import checkpoint_folder, load_checkpoint, unnorm_key
from ript.vla.demos import VLADemos, add_demo_args, prompt_table
from ript.vla.heads import LaplaceScaleHead
from ript.vla.prismatic import PAD_ID
from ript.vla.rl import laplace_log_prob, pixel_values


def run(args, cfg: ScaleHeadConfig) -> dict:
    seed_everything(args.seed)
    bench = get(args.benchmark, args.suite)
    files = [Path(f) for f in args.data]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vla = load_checkpoint(checkpoint_folder(args.checkpoint), device=device, adapter=None)
    if vla.action_head is None:
        raise ValueError(f"{vla.folder}: the scale head needs an OpenVLA-OFT checkpoint")
    model = vla.model
    stats = vla.norm_stats[args.unnorm_key or unnorm_key(vla.norm_stats, args.suite or bench.name)]
    tasks = bench.all_task_names()
    prompts = prompt_table(vla.tokenizer, bench, tasks)
    data = VLADemos(files, bench, stats, image_size=vla.image.size, chunk=model.chunk,
                    center_crop=args.center_crop, task_names=tasks)
    head = LaplaceScaleHead(model.hidden_size, model.action_dim).to(device)  # seeded above
    dtype = next(model.parameters()).dtype

    def loss_fn(batch):
        ids = prompts[batch["task"].cpu()]
        ids = ids[:, :int(ids.ne(PAD_ID).sum(1).max())].to(device)
        with torch.no_grad():  # the frozen policy, split as RIPT runs it (§4.3)
            px = pixel_values(batch["images"], vla.image_norm).to(dtype)
            cache = model.prefix_cache(ids, px, batch["proprio"].to(dtype), vla.proprio_projector)
            hidden = model.suffix_hidden(cache)
            mu = vla.action_head(hidden).float()
        log_b = head(hidden).float()
        a = batch["actions"]
        nll = -laplace_log_prob(a, mu, log_b, clip=None).sum(-1).mean()
        with torch.no_grad():
            metrics = {"loss": float(nll), "l1": float((a - mu).abs().mean()),
                       "mean_log_b": float(log_b.mean()),
                       "nll_clipped": float(-laplace_log_prob(a, mu, log_b).sum(-1).mean())}
        return nll, metrics

    groups = decay_groups(head, list(head.named_parameters()), cfg.train.weight_decay,
                          cfg.train.decay)
    out = Path(args.out)
    ckpt_dir = out.parent / "ckpt"
    key = ckpt.resume_key(to_dict(cfg), args.seed, [*files, Path(args.checkpoint)],
                          code_hash(args), center_crop=args.center_crop)
    resume = ckpt.load_resume_state(ckpt_dir / "latest.pt", key)
    with stage_tracker(args, "scale-head", to_dict(cfg), metrics=ckpt_dir / "metrics.jsonl",
                       run_id=resume["mlflow_run_id"] if resume else None) as tracker:
        if not resume and tracker.metrics_path.exists():
            tracker.metrics_path.unlink()
        summary = train_loop(head, loss_fn, groups, data, cfg.train, tracker, ckpt_dir=ckpt_dir,
                             resume=resume, resume_key=key, seed=args.seed, device=device,
                             config=to_dict(cfg))
        with open(out, "wb") as f:
            torch.save(head.cpu().ript_state(), f)
        tracker.export_metrics(args.metrics)
        tracker.log_artifact(args.metrics)
        tracker.log_artifact(out)
    ckpt.clear_resume_state(ckpt_dir)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint manifest (JSON) or folder")
    add_demo_args(p)
    p.add_argument("--unnorm-key", default=None)
    p.add_argument("--out", required=True, help="the head file to write (scale_header.pth)")
    p.add_argument("--metrics", required=True)
    a = p.parse_args(argv)
    setup_threads(a)
    run(a, from_dict(ScaleHeadConfig, load_block(a.config), "scale_head"))


if __name__ == "__main__":
    main()
