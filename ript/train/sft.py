"""QueST supervised stages as one CLI (spec §3.5, §4.3, §4.5).

    stage 0  action autoencoder (SkillVAE) on action windows only
    stage 1  observation encoders + SkillGPT prior; the autoencoder is frozen
    stage 2  stage-1 loss + λ·L1 of decoded sampled tokens; the decoder is trainable too

    python -m ript.train.sft --stage 0 --data results/x/data/*.hdf5 --config '{...}' \
        --out model.pt --metrics metrics.jsonl --experiment-dir results/x

Resumes from `<out dir>/ckpt/latest.pt` when it was made with the same settings and inputs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from ript.config import from_dict, require, to_dict
from ript.data.dataset import SequenceDataset, load_contexts
from ript.data.hdf5 import data_meta  # noqa: F401 (a name tests use)
from ript.envs.benchmark import of_data
from ript.envs.worker import EpisodeContext
from ript.models import ObsEncoder, QuestPolicy, SkillGPT, SkillVAE
from ript.policy import policy_payload
from ript.settings import AutoencoderConfig, FinetuneConfig, OptimConfig, PriorConfig
from ript.stage import add_common_args, code_hash, load_block, setup_threads, stage_tracker
from ript.train import checkpoint as ckpt
from ript.train.loop import decay_groups, train_loop
from ript.utils import derived_seed, seed_everything

STAGE_CONFIGS = {0: AutoencoderConfig, 1: PriorConfig, 2: FinetuneConfig}
STAGE_NAMES = {0: "autoencoder", 1: "prior", 2: "finetune"}
VALIDATION_STREAM = 11  # derived_seed tag of validation rollouts: a stream of their own


def task_vocabulary(meta: dict, embedding_files: list[Path]) -> tuple[list[str], object]:
    """(task names by id, language-embedding table or None) of a new policy (spec §2.3).

    With embedding files (LIBERO: one per suite, e.g. LIBERO-90 then LIBERO-10 for the few-shot
    recipe) the vocabulary is their tasks in order, so stage 2 finds its target tasks already
    there; MetaWorld keeps the original's one-hot over all 50 tasks; other data: its own tasks.
    """
    if embedding_files:
        from ript.data.language import read_embeddings

        names, rows = [], []
        for f in embedding_files:
            e = read_embeddings(f)
            for n, row in zip(e["names"], e["embeddings"]):
                if n not in names:
                    names.append(n)
                    rows.append(torch.as_tensor(row, dtype=torch.float32))
        return names, torch.stack(rows)
    return of_data(meta).one_hot_vocabulary(list(meta["tasks"])), None


def build_model(stage: int, cfg, init: Path | None, prev: dict | None,
                dataset: SequenceDataset, vocab: list[str], table):
    """The module trained by `stage` (SkillVAE for 0, the whole QuestPolicy for 1/2)."""
    if stage == 0:
        return SkillVAE(**cfg.arch(dataset.action_dim))
    if stage == 1:
        ae = SkillVAE(**prev["arch"])
        ckpt.load_weights(init, ae, prev["state_dict"])
        if ae.action_dim != dataset.action_dim:
            raise ckpt.CheckpointError(f"{init}: autoencoder action_dim {ae.action_dim}, "
                                       f"data action_dim {dataset.action_dim}")
        obs_dims = {k: dataset.demos[0].lowdim[k].shape[-1] for k in cfg.lowdim_keys}
        enc = ObsEncoder(obs_dims, cfg.rgb_keys, d_model=cfg.d_model,
                         lowdim_width=cfg.lowdim_width, image_width=cfg.image_width,
                         n_tasks=len(vocab), augment=cfg.augment, task_names=vocab,
                         task_emb_dim=None if table is None else table.shape[1])
        if table is not None:
            enc.set_task_embeddings(table)
        prior = SkillGPT(ae.vocab_size, ae.n_tokens, cfg.d_model, cfg.layers, cfg.heads,
                         cfg.ffn, cfg.dropout)
        return QuestPolicy(ae, enc, prior, cfg.action_horizon, cfg.top_k, cfg.temperature)
    policy = QuestPolicy.from_arch(prev["arch"])
    ckpt.load_weights(init, policy, prev["state_dict"])
    return policy


def validation_contexts(benchmark, demo_contexts: list, data: dict, episodes: int,
                        seed: int) -> list[EpisodeContext]:
    """`episodes` validation episodes per task of the data, from the *training* contexts only.

    With task variants (MetaWorld) the pool of a task is its non-held-out variants that no demo
    started from (all its non-held-out variants if the demos used every one); otherwise
    (LIBERO) the demos' own start states. Both come from `benchmark.train_contexts`, the set
    RIPT trains on, which is disjoint from `eval_contexts` by construction (the last
    `eval_variants` variants, or the benchmark's fixed init states): a checkpoint chosen on
    these episodes has never seen the held-out evaluation. Episode i cycles the pool; its env
    seed is derived from (seed, VALIDATION_STREAM, task id, i), apart from every other stream.
    """
    used = {(c.task, c.variant) for c in demo_contexts}
    if benchmark.variant_contexts:
        pool = benchmark.train_contexts("train_variants", demo_contexts, data)
        fresh = [c for c in pool if (c.task, c.variant) not in used]
    else:
        pool, fresh = benchmark.train_contexts("demos", demo_contexts, data), []
    out = []
    for task in dict.fromkeys(c.task for c in demo_contexts):  # data order
        cands = [c for c in fresh if c.task == task] or [c for c in pool if c.task == task]
        for i in range(episodes):
            c = cands[i % len(cands)]
            init = np.asarray(c.init_state, np.float64) if len(c.init_state) else None
            out.append(EpisodeContext(len(out), task, c.variant,
                                      derived_seed(seed, VALIDATION_STREAM, c.task_id, i), init))
    return out


class Validator:
    """Periodic validation rollouts of the policy being trained (stages 1-2, issue #17):
    `__call__(step)` runs the fixed validation episodes in eval mode and returns `val_success`
    and `val_success/<task>`. Every evaluation uses the same episodes and the same sampling
    seed (common random numbers), so checkpoints are compared on equal terms."""

    def __init__(self, policy, meta: dict, files: list[Path], cfg: OptimConfig, seed: int,
                 where: str):
        self.policy, self.cfg = policy, cfg
        self.benchmark = of_data(meta)
        require(cfg.eval_max_episode_steps <= self.benchmark.step_limit,
                f"{where}.eval_max_episode_steps",
                f"{self.benchmark.name} episodes end at {self.benchmark.step_limit} steps")
        self.contexts = validation_contexts(self.benchmark, load_contexts(files), meta,
                                            cfg.eval_episodes, seed)
        self.tasks = list(dict.fromkeys(c.task for c in self.contexts))
        self.obs_spec = {"image": meta["image"], "image_size": meta["image_size"]}
        self.seed, self.where, self.runner = derived_seed(seed, VALIDATION_STREAM), where, None
        self.last_records: list = []  # the latest evaluation's episodes (tests inspect them)

    def __call__(self, step: int) -> dict[str, float]:
        if self.runner is None:  # simulator workers only once validation is first due
            self.runner = self.benchmark.make_runner(
                self.obs_spec, self.cfg.eval_n_envs, self.cfg.eval_n_workers,
                self.cfg.eval_max_episode_steps, where=self.where)
        was_training = self.policy.training
        self.policy.eval()
        try:
            recs = self.runner.run(self.policy, self.contexts, seed=self.seed)
        finally:
            self.policy.train(was_training)
        self.last_records = recs
        per_task = {f"val_success/{t}": float(np.mean([r.success for r in recs if r.task == t]))
                    for t in self.tasks}
        return {"val_success": float(np.mean([r.success for r in recs])), **per_task,
                "val_errors": sum(r.error is not None for r in recs)}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


def run_stage(stage: int, cfg, files: list[Path], out: Path, metrics_out: Path, args,
              init: Path | None = None, embedding_files: list[Path] | None = None) -> dict:
    seed_everything(args.seed)
    meta = data_meta(files)
    prev = ckpt.load(init) if stage > 0 else None
    needed = {1: "autoencoder", 2: "policy"}.get(stage)
    if prev is not None and prev.get("kind") != needed:
        what = "the stage-0 autoencoder" if stage == 1 else "a stage-1 policy"
        raise ckpt.CheckpointError(f"{init}: stage {stage} needs {what} file, "
                                   f"got kind={prev.get('kind')!r}")
    if stage == 0:
        obs_keys, chunk = None, cfg.chunk_size
    elif stage == 1:
        obs_keys, chunk = cfg.lowdim_keys + cfg.rgb_keys, prev["arch"]["chunk_size"]
    else:
        obs_keys, chunk = prev["meta"]["obs_keys"], prev["arch"]["autoencoder"]["chunk_size"]
    if stage == 0:
        vocab, table = None, None
    elif stage == 2:
        vocab, table = prev["arch"]["obs_encoder"].get("task_names"), None
    else:
        vocab, table = task_vocabulary(meta, list(embedding_files or []))
    task_ids = None if vocab is None else {t: i for i, t in enumerate(vocab)}
    dataset = SequenceDataset(files, obs_keys, seq_len=chunk, pad_seq_length=True,
                              task_ids=task_ids)
    model = build_model(stage, cfg, init, prev, dataset, vocab, table)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if stage == 0:
        params = list(model.named_parameters())
        groups = decay_groups(model, params, cfg.train.weight_decay, cfg.train.decay)

        def loss_fn(batch):
            return model.loss(batch["actions"], batch["pad_mask"] if cfg.mask_padding else None)
    else:
        head = getattr(cfg, "train_output_head", True)  # stage 2's key
        model.freeze_for_stage(stage, head)
        params = model.trainable_parameters(stage, head)
        groups = decay_groups(model, params, cfg.train.weight_decay, cfg.train.decay)
        l1 = getattr(cfg, "l1_weight", 0.0)
        mask = getattr(cfg, "mask_padding", True)  # stage 2's key; stage 1 has no L1 term

        def loss_fn(batch):
            # QueST conditions on the current frame only (frame_stack = obs_seq_len = 1): drop
            # the dataset's frame axis so images are (B, 3, H, W) as at inference.
            batch["obs"] = {k: v[:, -1] for k, v in batch["obs"].items()}
            return model.stage_loss(batch, stage, l1_weight=l1, mask_padding=mask)

    ckpt_dir = out.parent / "ckpt"
    key = ckpt.resume_key(to_dict(cfg), args.seed,
                          [*files, *([init] if init else []), *(embedding_files or [])],
                          code_hash(args), stage=stage)
    resume = ckpt.load_resume_state(ckpt_dir / "latest.pt", key)
    name = STAGE_NAMES[stage]
    with stage_tracker(args, name, to_dict(cfg), metrics=ckpt_dir / "metrics.jsonl",
                       run_id=resume["mlflow_run_id"] if resume else None) as tracker:
        if not resume and tracker.metrics_path.exists():
            tracker.metrics_path.unlink()  # a fresh run starts a fresh curve
        validator = None
        if stage > 0 and cfg.train.eval_every > 0:
            validator = Validator(model, meta, files, cfg.train, args.seed, f"{name}.train")
        try:
            summary = train_loop(model, loss_fn, groups, dataset, cfg.train, tracker,
                                 ckpt_dir=ckpt_dir, resume=resume, resume_key=key,
                                 seed=args.seed, device=device, config=to_dict(cfg),
                                 evaluate=validator)
        finally:
            if validator is not None:
                validator.close()
        out_meta = {"data": meta, "stage": stage, "obs_keys": obs_keys or [],
                    "obs_spec": {"image": meta["image"], "image_size": meta["image_size"]},
                    "task_names": meta["tasks"],
                    "action_dim": dataset.action_dim, "steps": summary["steps"]}
        if stage == 2:
            # a stage-1 selection is not this stage's
            out_meta = {**{k: v for k, v in prev["meta"].items() if k != "selected_step"},
                        **out_meta}
        if "selected_step" in summary:  # select: best_validation; model holds those weights
            out_meta["selected_step"] = int(summary["selected_step"])
        ckpt.save(out, policy_payload(model, out_meta) if stage else
                  {"kind": "autoencoder", "arch": model.arch, "meta": out_meta,
                   "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}})
        tracker.export_metrics(metrics_out)
        tracker.log_artifact(metrics_out)
        tracker.log_artifact(out)
    ckpt.clear_resume_state(ckpt_dir)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--stage", type=int, choices=[0, 1, 2], required=True)
    p.add_argument("--data", nargs="+", required=True, help="demonstration HDF5 files")
    p.add_argument("--init", help="model file of the previous stage (stages 1 and 2)")
    p.add_argument("--task-embeddings", nargs="*", default=[],
                   help="stage 1: language-embedding files (.npz, one per suite) of the task "
                        "vocabulary; none = one-hot task ids")
    p.add_argument("--out", required=True, help="final model file")
    p.add_argument("--metrics", required=True, help="final JSONL metrics file")
    a = p.parse_args(argv)
    setup_threads(a)
    cfg = from_dict(STAGE_CONFIGS[a.stage], load_block(a.config), STAGE_NAMES[a.stage])
    if a.stage > 0 and not a.init:
        p.error(f"--stage {a.stage} needs --init (the previous stage's model file)")
    summary = run_stage(a.stage, cfg, [Path(f) for f in a.data], Path(a.out), Path(a.metrics),
                        a, Path(a.init) if a.init else None,
                        [Path(f) for f in a.task_embeddings])
    print({k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
           for k, v in summary.items()})


if __name__ == "__main__":
    main()
