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
random actions (reference rows and tests).

Infrastructure errors (a dead or hung simulator worker, an env exception) are not policy
failures: success is counted over the episodes that ran, the errors are reported beside it, and
more than `max_error_fraction` of them fail the job — its records are kept in
`episodes.failed.csv` / `summary.failed.json`, which Snakemake does not delete.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ript.config import from_dict, require, to_dict
from ript.envs.runner import (EpisodeContext, EpisodeRecord, MetaWorldRunner, RandomPolicy,
                              ScriptedExpertPolicy)
from ript.results import aggregate, save_videos, summarize, write_episodes
from ript.utils import derived_seed, seed_everything, write_json

# The data stage's default; used when a checkpoint carries no data settings (scripted policies).
DEFAULT_EVAL_VARIANTS = 25


@dataclass
class EvalConfig:
    episodes_per_task: int = 25
    """Evaluation episodes per task (QueST MetaWorld: 50; RIPT LIBERO code: 48, paper: 50)."""
    n_envs: int = 5
    """Episodes run concurrently (the policy's batch)."""
    n_workers: int = 2
    """Simulator worker processes (0 = step in the main process); results do not depend on it."""
    max_episode_steps: int = 500
    """Step limit per episode (MetaWorld: 500; LIBERO: 600 in QueST/RIPT)."""
    videos: int = 0
    """Save the first n episodes as videos (needs image observations)."""
    step_timeout_s: float = 60.0
    """Longest wait for a simulator worker before it is killed and its episodes failed."""
    legacy_reset: bool = False
    """LIBERO only: the original's stale-first-observation reset (spec §8 B4), for parity."""
    max_error_fraction: float = 0.0
    """Largest fraction of episodes that may end in an infrastructure error (dead or hung
    worker, simulator exception) before the job fails; errored episodes are left out of the
    success rate, so a tolerated error changes the sample size, never the score."""

    def validate(self) -> None:
        require(self.episodes_per_task >= 1, "evaluation.episodes_per_task", "must be >= 1")
        require(self.n_envs >= 1, "evaluation.n_envs", "must be >= 1")
        require(self.n_workers >= 0, "evaluation.n_workers", "must be >= 0")
        require(self.max_episode_steps >= 1, "evaluation.max_episode_steps", "must be >= 1")
        require(self.videos >= 0, "evaluation.videos", "must be >= 0")
        require(self.step_timeout_s > 0, "evaluation.step_timeout_s", "must be > 0")
        require(0.0 <= self.max_error_fraction <= 1.0, "evaluation.max_error_fraction",
                "must be in [0, 1]")


def eval_contexts(task: str, cfg: EvalConfig, seed: int,
                  eval_variants: int = DEFAULT_EVAL_VARIANTS,
                  suite: str | None = None) -> list[EpisodeContext]:
    """Episode i → held-out variant (MetaWorld) or fixed init state (LIBERO `suite`) i mod
    count, with env seed derived from (seed, task id, i). `eval_variants` comes from the
    policy's data."""
    if suite is None:
        from ript.envs.metaworld import task_id, variant_split

        tid, pool = task_id(task), list(variant_split(eval_variants)[1])
    else:
        from ript.envs.libero import task_index, task_init_states

        tid = task_index(suite, task)
        pool = list(range(len(task_init_states(suite, task))))
    return [EpisodeContext(i, task, pool[i % len(pool)], derived_seed(seed, tid, i))
            for i in range(cfg.episodes_per_task)]


def load_policy(checkpoint: str):
    """-> (policy, meta) with meta['obs_spec'] (dict) and meta['task_names'] (list)."""
    if checkpoint.startswith("scripted:"):
        from ript.envs.metaworld import all_tasks

        kind = checkpoint.split(":", 1)[1]
        policies = {"expert": ScriptedExpertPolicy, "random": RandomPolicy}
        if kind not in policies:
            raise ValueError(f"unknown scripted policy {kind!r}; valid: {sorted(policies)}")
        return policies[kind](), {"obs_spec": {"image": False}, "task_names": all_tasks()}
    from ript.train.checkpoint import load_policy as load

    return load(checkpoint)


def make_runner(suite: str | None, obs_spec: dict, n_envs: int, n_workers: int,
                max_episode_steps: int, *, step_timeout_s: float = 60.0,
                legacy_reset: bool = False, where: str = "evaluation"):
    """The runner of the policy's benchmark (MetaWorld if `suite` is None, else that LIBERO
    suite); shared by evaluation and RIPT. `where` names the config block in errors."""
    if suite is None:
        from ript.envs.metaworld import ObsSpec

        require(max_episode_steps <= 500, f"{where}.max_episode_steps",
                "MetaWorld episodes end at 500 steps")
        return MetaWorldRunner(ObsSpec(**obs_spec), n_envs, n_workers, max_episode_steps,
                               step_timeout_s)
    from ript.envs.libero import LiberoRunner

    return LiberoRunner(suite, n_envs, n_workers, max_episode_steps,
                        image_size=obs_spec.get("image_size", 128),
                        image=obs_spec.get("image", True), legacy_reset=legacy_reset,
                        step_timeout_s=step_timeout_s)


def evaluate(policy, task: str, cfg: EvalConfig, seed: int, obs_spec: dict,
             task_names: list[str] | None = None,
             eval_variants: int = DEFAULT_EVAL_VARIANTS,
             suite: str | None = None) -> list[EpisodeRecord]:
    """Run the evaluation episodes of one task; deterministic under `seed`."""
    runner = make_runner(suite, obs_spec, cfg.n_envs, cfg.n_workers, cfg.max_episode_steps,
                         step_timeout_s=cfg.step_timeout_s, legacy_reset=cfg.legacy_reset)
    contexts = eval_contexts(task, cfg, seed, eval_variants, suite)
    with runner:
        tid = runner.factory.task_id(task)
        return runner.run(policy, contexts, seed=derived_seed(seed, tid, 2**31), tasks=task_names,
                          progress_desc=f"eval {task}", video_episodes=cfg.videos)


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
    args = p.parse_args(argv)
    block = load_block(args.config)
    cfg = from_dict(EvalConfig, block, "evaluation")
    setup_threads(args)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    policy, meta = load_policy(args.checkpoint)
    policy = place_policy(policy, device)
    # The held-out variants are the ones the policy's own data held out (never a demo's).
    data = meta.get("data") or {}
    eval_variants = int(data.get("eval_variants") or DEFAULT_EVAL_VARIANTS)
    suite = data.get("suite")  # LIBERO suite of the policy's data; None = MetaWorld
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    failed = {"episodes": out / "episodes.failed.csv", "summary": out / "summary.failed.json"}
    with stage_tracker(args, f"eval-{args.policy_name}", to_dict(cfg),
                       metrics=out / "metrics.jsonl", task=args.task) as tracker:
        tracker.truncate_after(-1)  # a rerun replaces the previous evaluation's metrics
        records = evaluate(policy, args.task, cfg, args.seed, dict(meta["obs_spec"]),
                           list(meta["task_names"]), eval_variants, suite)
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
