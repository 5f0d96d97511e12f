"""Every config block's dataclass: its keys, their defaults and the block's own checks.

The one source of defaults (issue #12): the stages build their config from these classes
(`ript.config.from_dict`), `ript/experiment.py` fills every block of an experiment's config from
them before the first job, and `config/README.md` is tested against them. The data blocks live
with their benchmark (`ript/envs/<benchmark>.py`), since each benchmark has its own keys; the
OpenVLA family's blocks (`policy`, `vla_sft`, `scale_head`) in `ript/vla/settings.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ript.config import require, to_dict


@dataclass
class OptimConfig:
    """Optimisation of one supervised stage (spec §3.5, §4.3)."""

    steps: int = 2000
    """Optimiser steps (resume is exact at any step)."""
    epochs: float | None = None
    """If set, train this many passes over the windows instead (the original's unit, spec §3.5,
    §4.3): steps = ceil(epochs × windows / batch_size), known once the data is loaded."""
    batch_size: int = 256
    """Windows per batch (256 for stage 0 and 128 for stage 1 in the paper)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_min: float = 1e-5
    """Cosine schedule floor."""
    weight_decay: float = 1e-4
    """AdamW weight decay, on the weights `decay` selects (never biases, norms, embeddings)."""
    decay: Literal["linear", "all_weights"] = "linear"
    """Which weights decay: Linear/Conv weights only, or every weight that is not a norm's or
    an embedding's (QueST's `separate_no_decay`; adds the autoencoder's attention in_proj)."""
    grad_clip: float = 100.0
    """Global gradient-norm clip."""
    checkpoint_every: int = 200
    """Steps between resume checkpoints (ckpt/latest.pt)."""
    log_every: int = 20
    """Steps between metric records."""
    num_workers: int = 0
    """DataLoader worker processes (images are read lazily from HDF5)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Arithmetic of the forward pass: fp32, or bf16 autocast (matmuls and convolutions in
    bfloat16, weights, optimiser and losses in fp32). bf16 trained the paper-size stages 1.45-1.66x
    faster on a CPU with AVX512-BF16 (benchmarks/bench_models.py); CPUs without it emulate bf16
    and get slower. The original trains in fp32 (its fp16 AMP is off, spec §3.5)."""
    eval_every: int = 0
    """Steps between validation rollouts (and at the last step); 0 = off. Stages 1 and 2 only:
    the episodes start from training contexts, never the held-out evaluation ones."""
    eval_episodes: int = 10
    """Validation episodes per task at each validation evaluation."""
    eval_max_episode_steps: int = 500
    """Step limit of a validation episode (MetaWorld: 500; LIBERO: 600 in QueST)."""
    eval_n_envs: int = 10
    """Validation episodes run concurrently (the policy's batch)."""
    eval_n_workers: int = 1
    """Simulator worker processes of the validation runner (0 = the training process)."""
    select: Literal["last", "best_validation"] = "last"
    """The weights written as model.pt: the last step's, or those of the validation evaluation
    with the highest success, ties to the earlier step (QueST's MetaWorld few-shot protocol,
    which picked on the test episodes; here on validation contexts)."""

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        require(self.lr > 0 and 0 <= self.lr_min <= self.lr, "train.lr_min",
                "needs 0 <= lr_min <= lr and lr > 0")
        require(self.num_workers >= 0, "train.num_workers", "must be >= 0")
        require(self.epochs is None or self.epochs > 0, "train.epochs", "must be > 0")
        require(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = off)")
        for name in ("eval_episodes", "eval_max_episode_steps", "eval_n_envs"):
            require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        require(self.eval_n_workers >= 0, "train.eval_n_workers", "must be >= 0")
        require(self.select == "last" or self.eval_every > 0, "train.select",
                f"{self.select} selects among validation evaluations: set train.eval_every > 0")


@dataclass
class AutoencoderConfig:
    """Block `autoencoder`: SkillVAE architecture (spec §3.1) and its training."""

    chunk_size: int = 32
    """Actions per chunk T (skill_block_size)."""
    downsample: int = 4
    """Temporal downsampling F (a power of two); tokens per chunk = T / F."""
    d_model: int = 256
    """Width of encoder and decoder."""
    enc_layers: int = 2
    """Causal transformer encoder layers."""
    dec_layers: int = 4
    """Transformer decoder layers."""
    heads: int = 4
    """Attention heads."""
    ffn: int = 1024
    """Feed-forward width."""
    dropout: float = 0.1
    """Dropout in both transformers."""
    quantizer: Literal["fsq", "vq"] = "fsq"
    """FSQ (the paper's) or VQ (ablation) bottleneck, from vector-quantize-pytorch."""
    codebook_size: int = 1024
    """Requested codebook size; FSQ maps it to levels (1024 → [8,5,5,5] = 1000 codes)."""
    fsq_levels: list[int] | None = None
    """Explicit FSQ levels (overrides codebook_size for FSQ)."""
    commitment_weight: float = 0.25
    """VQ only: weight of the commitment loss (QueST: the library's default, 1.0)."""
    codebook_dim: int | None = None
    """VQ only: codebook width, projected from d_model (None = d_model; QueST: 512)."""
    causal_norm: bool = True
    """GroupNorm in the encoder's conv stack with running (causal) statistics, so a token never
    sees later actions; false = GroupNorm over the whole chunk, as QueST (spec §3.2)."""
    mask_padding: bool = True
    """Average the L1 over real steps only; false = over all T steps, padded repeats of a demo's
    last action included, as the original (spec §3.5)."""
    train: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation settings of stage 0."""

    def validate(self) -> None:
        # Stage 0 learns an action autoencoder: there is no policy to roll out yet.
        require(self.train.eval_every == 0 and self.train.select == "last",
                "autoencoder.train.eval_every", "stage 0 trains an action autoencoder, which "
                "cannot be rolled out: leave train.eval_every at 0 and train.select at last")
        require(self.chunk_size % self.downsample == 0, "autoencoder.chunk_size",
                f"{self.chunk_size} is not divisible by autoencoder.downsample "
                f"({self.downsample}): each token must cover a whole number of actions")

    def arch(self, action_dim: int) -> dict:
        """SkillVAE's constructor arguments (its `arch`, stored in model files)."""
        d = to_dict(self)
        for training_only in ("train", "mask_padding"):
            d.pop(training_only)
        d["strict_causal"] = d.pop("causal_norm")  # the model's (and old model files') name
        return {"action_dim": action_dim, **d}


@dataclass
class PriorConfig:
    """Block `prior`: observation encoders + SkillGPT (spec §4.1-4.4) and stage-1 training."""

    lowdim_keys: list[str] = field(default_factory=lambda: ["robot_states"])
    """Low-dim observation keys, each projected by a linear layer."""
    rgb_keys: list[str] = field(default_factory=list)
    """Image observation keys, each through a ResNet-18 trunk + spatial softmax."""
    d_model: int = 384
    """Width of the prior and of the context tokens."""
    layers: int = 6
    """Transformer layers of SkillGPT."""
    heads: int = 6
    """Attention heads."""
    ffn: int = 1536
    """Feed-forward width."""
    dropout: float = 0.1
    """Embedding/attention dropout."""
    lowdim_width: int = 128
    """Output width of each low-dim projection."""
    image_width: int = 256
    """Output width of each image encoder."""
    augment: bool = True
    """Train-time image augmentation (random shift + colour jitter, spec §2.4)."""
    action_horizon: int = 8
    """Actions executed from each decoded 32-step chunk before replanning (T_a)."""
    top_k: int = 5
    """Top-k sampling at inference (the original's `beam_size`)."""
    temperature: float = 1.0
    """Sampling temperature at inference."""
    train: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation settings of stage 1."""

    def validate(self) -> None:
        require(len(self.lowdim_keys) + len(self.rgb_keys) > 0, "prior",
                "needs at least one observation key (lowdim_keys or rgb_keys)")


@dataclass
class FinetuneConfig:
    """Block `finetune`: QueST stage 2, decoder fine-tuning (spec §4.5)."""

    enabled: bool = False
    """Run stage 2 between the prior and RIPT (QueST's few-shot recipe)."""
    l1_weight: float = 10.0
    """λ: weight of the L1 between decoded sampled tokens and the demo actions."""
    mask_padding: bool = True
    """Average that L1 over real steps only; false = over all T steps, padded repeats included,
    as the original (spec §3.5, §4.5)."""
    train_output_head: bool = True
    """Also train the decoder's output layer (Linear d_model → A); false = only the decoder's
    transformer, as QueST, whose `action_head` sits outside `autoencoder.decoder` (spec §4.5)."""
    train: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation settings of stage 2."""


@dataclass
class RiptConfig:
    """Block `ript` (spec §5.9; defaults = the shipped LIBERO scripts)."""

    enabled: bool = True
    """Run RIPT; false evaluates the SFT policy (or a VLA checkpoint) as it is."""
    iterations: int = 15
    """RIPT iterations (rollout collection + PPO); 15 for LIBERO-90, 30 for the suites."""
    tasks: list[str] | None = None
    """Train on the contexts of these tasks only (a subset of data.tasks); evaluation still
    covers every task. null = all (the LIBERO-Long and -Object OFT scripts use 4 of 10)."""
    contexts: Literal["demos", "train_variants"] = "demos"
    """Context set D_c: one per SFT demo, its first MuJoCo state (the paper, §5.2), or every
    non-held-out MetaWorld task variant (MetaWorld only: contexts need no demonstration; more
    contexts help, paper Fig. 6)."""
    group_size: int = 8
    """K rollouts per context (the paper reports K = 16, the scripts use 8)."""
    contexts_per_iteration: int = 180
    """Target informative groups per iteration, over all ranks."""
    dynamic_sampling: bool = True
    """Drop groups whose K rewards are all equal and draw further contexts (§5.1)."""
    early_stop_fraction: float = 0.8
    """Stop collecting once this fraction of the target is reached over all ranks."""
    max_rejected_groups: int = 720
    """Cap on rejected groups per rank and iteration (bounds collection; §8 B3)."""
    ppo_epochs: int = 20
    """PPO passes over each iteration's buffer."""
    minibatch_episodes: int = 6
    """Episodes per PPO minibatch over all ranks."""
    ppo_micro_rows: int = 0
    """Backpropagate a minibatch this many (episode, step) rows at a time: the same gradient
    with bounded activation memory (a 7-B VLA; the original: one step per backward). 0 = the
    whole minibatch at once."""
    lr: float = 1e-6
    """AdamW learning rate of the prior (constant, as the original effectively is, §8 B8)."""
    weight_decay: float = 1e-4
    """AdamW weight decay on Linear weights."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    clip_low: float = 0.2
    """PPO ε below 1 (ratio ≥ 1 − clip_low)."""
    clip_high: float = 0.2
    """PPO ε above 1 (ratio ≤ 1 + clip_high); asymmetric clipping when ≠ clip_low."""
    token_level_mean: bool = True
    """Average the loss over all valid tokens of a minibatch (else per episode, §5.6)."""
    kl_coef: float = 0.0
    """Optional KL(π_θ ‖ π_SFT) penalty; off as in the original (whose kl_coef was unused)."""
    ratio_distribution: Literal["full_softmax", "sampled_topk"] = "full_softmax"
    """Token distribution of the PPO ratio: the full softmax (the original) or the top-k
    distribution rollouts actually sample from (removes the mismatch of spec §8 B12)."""
    max_episode_steps: int = 500
    """Step limit of a rollout (500 in MetaWorld, 600 in LIBERO)."""
    n_envs: int = 16
    """Concurrent episodes (= the policy's batch during rollouts)."""
    n_workers: int = 2
    """Environment worker processes."""
    collection: Literal["rounds", "streaming"] = "rounds"
    """Rollout collection (one rank): rounds of one runner call each (as many groups as fill
    the slots; a round waits for its slowest episode), or streaming: one call per iteration
    keeps every slot busy and judges each group as soon as it ends (issue #16). Several ranks
    always collect in rounds (the cross-rank early stop needs a collective between them)."""
    context_sampling: Literal["uniform", "adaptive"] = "uniform"
    """Which contexts groups start from: uniform (the original's reshuffled stream, spec §5.2)
    or adaptive: contexts whose last groups in a row had K equal rewards are drawn less often
    (weight context_decay**streak, streak capped at 3), never excluded (issue #16)."""
    context_decay: float = 0.5
    """Adaptive context sampling: weight factor per uniform group in a row."""
    eval_every: int = 1
    """Evaluate on held-out contexts every this many iterations (and before the first)."""
    eval_episodes_per_task: int = 10
    """Held-out episodes per task at each in-training evaluation."""
    # -- OpenVLA-OFT only (vla_spec §4; `lr` is then the LoRA's, `grad_clip` the LoRA group's) --
    head_lr: float = 5e-5
    """OFT: AdamW learning rate of the L1 action head (vla_spec §4.4 `header_lr`)."""
    head_grad_clip: float = 1.0
    """OFT: gradient-norm clip of the head group, apart from the LoRA's `grad_clip` (§4.4)."""
    scale_factor: float = 5.0
    """OFT: rollouts sample a ~ Laplace(μ, s·b) with this s (§4.2; 2 for LIBERO-Spatial)."""
    lora_rank: int = 32
    """OFT: rank of the fresh LoRA on every Linear of the LLM (§4.4)."""
    lora_alpha: int = 16
    """OFT: LoRA alpha (§4.4)."""
    train_scale_head: bool = False
    """OFT: also train the Laplace scale head (every suite config of the original fixes it)."""

    def validate(self) -> None:
        require(self.head_lr > 0 and self.head_grad_clip > 0 and self.scale_factor > 0,
                "ript.head_lr", "head_lr, head_grad_clip and scale_factor must be > 0")
        require(self.lora_rank >= 1 and self.lora_alpha >= 1, "ript.lora_rank",
                "lora_rank and lora_alpha must be >= 1")
        require(self.group_size >= 2, "ript.group_size", "K must be >= 2 (leave-one-out)")
        for k in ("iterations", "contexts_per_iteration", "max_rejected_groups", "n_envs",
                  "minibatch_episodes", "eval_every", "eval_episodes_per_task"):
            require(getattr(self, k) >= 1, f"ript.{k}", "must be >= 1")
        require(self.ppo_epochs >= 0, "ript.ppo_epochs", "must be >= 0")
        require(0 < self.context_decay <= 1, "ript.context_decay", "must be in (0, 1]")
        require(self.ppo_micro_rows >= 0, "ript.ppo_micro_rows", "must be >= 0 (0 = off)")
        require(0 < self.early_stop_fraction <= 1, "ript.early_stop_fraction", "must be in (0, 1]")
        require(0 <= self.clip_low < 1 and self.clip_high >= 0, "ript.clip_low",
                "needs 0 <= clip_low < 1 and clip_high >= 0")
        require(self.lr > 0 and self.grad_clip > 0, "ript.lr", "lr and grad_clip must be > 0")
        require(self.n_workers >= 0 and self.kl_coef >= 0, "ript.n_workers",
                "n_workers and kl_coef must be >= 0")


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


@dataclass
class ReportConfig:
    """Block `report`."""

    title: str = "RIPT on QueST"
    """Heading of the report page."""
    dpi: int = 110
    """Resolution of the figures."""

    def validate(self) -> None:
        require(30 <= self.dpi <= 600, "report.dpi", "must be in [30, 600]")


@dataclass
class PretrainConfig:
    """Block `pretrain`: the few-shot recipe's pretraining task set (spec §4.5)."""

    tasks: list[str] | str
    """Task names, or "all" (every task of a LIBERO suite)."""
    suite: str | None = None
    """LIBERO suite of these tasks (LIBERO only)."""
    demos_per_task: int = 50
    """Demonstrations per pretraining task."""


@dataclass
class LanguageConfig:
    """Block `language`: LIBERO task embeddings for the task token (spec §2.3)."""

    encoder: Literal["minilm", "clip"] = "minilm"
    """Offline all-MiniLM-L6-v2 (384-d) or the original's CLIP text tower (needs a network)."""
