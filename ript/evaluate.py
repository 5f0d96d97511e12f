"""Stage 'evaluate' (spec §6): success rate of a policy on one task, with a confidence interval.

    python -m ript.evaluate --checkpoint model.pt --task push-v3 --config '{...}' \
        --out-dir results/exp/eval/sft/push-v3 --experiment-dir results/exp [--policy-name sft] \
        [--device auto|cpu|cuda]
    python -m ript.evaluate aggregate --inputs a/summary.json b/summary.json --out table.csv

MetaWorld evaluation uses only the held-out task variants (`variant_split`), cycling over them —
never a demonstration's variant, so RIPT cannot have trained on an evaluation context. LIBERO
evaluation (the policy's data came from a LIBERO suite) uses the benchmark's fixed init states in
order (spec §6). Every episode has a recorded env seed derived from (seed, task, episode), and the
policy samples from one seeded generator, so a rerun reproduces every episode (unlike the
original, spec §8 B10).
`--checkpoint scripted:expert` / `scripted:random` evaluate MetaWorld's scripted experts / uniform
random actions (reference rows and tests). `--vla '{...}'` evaluates an OpenVLA-family checkpoint
folder (`ript.vla.policy.load_vla`; LIBERO, vla_spec §2-3).

Infrastructure errors (a dead or hung simulator worker, an env exception) are not policy
failures: success is counted over the episodes that ran, the errors are reported beside it, and
more than `max_error_fraction` of them fail the job — its records are kept in
`episodes.failed.csv` / `summary.failed.json`, which Snakemake does not delete.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ript.config import from_dict, to_dict
from ript.envs.benchmark import of_data
from ript.envs.runner import EpisodeRecord
from ript.policy import load_policy
from ript.results import aggregate, save_videos, summarize, write_episodes
from ript.settings import EvalConfig
from ript.utils import derived_seed, seed_everything, write_json


def evaluate(policy, task: str, cfg: EvalConfig, seed: int,
             meta: dict) -> list[EpisodeRecord]:
    """Run the evaluation episodes of one task; deterministic under `seed`. `meta` is the
    policy's: its data names the benchmark and its held-out contexts, `obs_spec` what the
    policy observes, `task_names` the tasks it was trained for."""
    data = meta.get("data") or {}
    bench = of_data(data)
    runner = bench.make_runner(dict(meta["obs_spec"]), cfg.n_envs, cfg.n_workers,
                               cfg.max_episode_steps, step_timeout_s=cfg.step_timeout_s,
                               legacy_reset=cfg.legacy_reset)
    contexts = bench.eval_contexts(task, cfg.episodes_per_task, seed, data)
    with runner:
        tid = bench.task_id(task)
        return runner.run(policy, contexts, seed=derived_seed(seed, tid, 2**31),
                          tasks=meta.get("task_names"), progress_desc=f"eval {task}",
                          video_episodes=cfg.videos)


def error_problem(summary: dict, max_error_fraction: float) -> str | None:
    """The message that fails the job when too many episodes errored, else None."""
    if summary["error_fraction"] <= max_error_fraction:
        return None
    return (f"evaluation of {summary['task']} failed: {summary['errors']} of "
            f"{summary['episodes']} episodes hit an infrastructure error (more than "
            f"evaluation.max_error_fraction = {max_error_fraction:g}); "
            f"first error: {summary['first_error']}")


def resolve_device(name: str):
    """--device auto|cpu|cuda -> torch.device; auto = CUDA when one is visible (as RIPT)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this process")
    return torch.device(name)


def place_policy(policy, device):
    """Move a learned policy to `device` (observations follow: QuestPolicy.plan moves them to
    the policy's device); scripted policies have no device and stay as they are."""
    if not hasattr(policy, "to"):
        return policy
    return policy.to(device)  # sampling draws from the runner's CPU generator (prior.py)


def _eval_main(argv) -> dict:
    from ript.stage import add_common_args, load_block, setup_threads, stage_tracker

    p = argparse.ArgumentParser(description="Evaluate a policy on one task (spec §6).")
    add_common_args(p)
    p.add_argument("--checkpoint", required=True,
                   help="model checkpoint, or scripted:expert / scripted:random")
    p.add_argument("--task", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--policy-name", default="policy", help="label in tables and the MLflow stage")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the policy runs (auto: CUDA when visible); simulators stay on CPU")
    p.add_argument("--vla", default=None,
                   help="an OpenVLA-family checkpoint: the config's `policy` block with the "
                        "`benchmark` and `suite` it acts in (JSON); --checkpoint is then the "
                        "checkpoint folder or its fetch manifest")
    args = p.parse_args(argv)
    block = load_block(args.config)
    cfg = from_dict(EvalConfig, block, "evaluation")
    setup_threads(args)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    if args.vla and Path(args.checkpoint).suffix != ".pt":  # a checkpoint folder or manifest
        from ript.vla.policy import load_vla

        policy, meta = load_vla(args.checkpoint, load_block(args.vla), device)
    else:  # a policy file: QueST's, or a RIPT-trained VLA's (LoRA + heads)
        policy, meta = load_policy(args.checkpoint)
        policy = place_policy(policy, device)
        if hasattr(policy, "sampling"):
            policy.sampling = False  # a VLA evaluates its mean / greedy action (vla_spec §4.6)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    failed = {"episodes": out / "episodes.failed.csv", "summary": out / "summary.failed.json"}
    with stage_tracker(args, f"eval-{args.policy_name}", to_dict(cfg),
                       metrics=out / "metrics.jsonl", task=args.task) as tracker:
        tracker.truncate_after(-1)  # a rerun replaces the previous evaluation's metrics
        # the held-out contexts of the policy's own data (never a demo's or RIPT's)
        records = evaluate(policy, args.task, cfg, args.seed, meta)
        summary = summarize(args.task, records, args.policy_name)
        summary.update(seed=args.seed, checkpoint=str(args.checkpoint), device=str(device),
                       variants=sorted({r.variant for r in records}))
        if cfg.videos and not any(r.frames for r in records):
            warnings.warn("videos requested but the observations have no images", stacklevel=1)
        save_videos(out, records)
        tracker.log_metrics({k: summary[k] for k in ("success_rate", "wilson_low", "wilson_high",
                                                     "mean_length", "errors", "error_fraction")},
                            step=0)
        problem = error_problem(summary, cfg.max_error_fraction)
        if problem:
            # Undeclared files: Snakemake deletes a failed job's outputs, not these, so the
            # records of the failed attempt survive for inspection.
            write_episodes(failed["episodes"], records)
            write_json(failed["summary"], summary)
            tracker.log_artifact(failed["summary"])
            raise SystemExit(f"{problem}. Nothing was scored; the records are kept in "
                             f"{failed['episodes']} and {failed['summary']}")
        for stale in failed.values():  # left by an earlier failed attempt, now superseded
            stale.unlink(missing_ok=True)
        write_episodes(out / "episodes.csv", records)
        write_json(out / "summary.json", summary)
        tracker.log_artifact(out / "summary.json")
        tracker.log_artifact(out / "episodes.csv")
    print(f"{args.task}: {summary['successes']}/{summary['episodes'] - summary['errors']} = "
          f"{summary['success_rate']:.3f} [{summary['wilson_low']:.3f}, "
          f"{summary['wilson_high']:.3f}], mean length {summary['mean_length']:.1f}")
    if summary["errors"]:
        print(f"WARNING: {summary['errors']} of {summary['episodes']} episodes hit an "
              f"infrastructure error and were not scored (tolerated by "
              f"max_error_fraction = {cfg.max_error_fraction:g}); first error: "
              f"{summary['first_error']}", file=sys.stderr)
    return summary


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["aggregate"]:
        p = argparse.ArgumentParser(prog="python -m ript.evaluate aggregate",
                                    description="Per-task table of evaluation summaries.")
        p.add_argument("--inputs", nargs="+", required=True, help="summary.json files")
        p.add_argument("--out", required=True, help="CSV table to write")
        a = p.parse_args(argv[1:])
        aggregate(a.inputs, a.out)
    else:
        _eval_main(argv)


if __name__ == "__main__":
    main()
