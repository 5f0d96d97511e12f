"""The per-iteration PPO update loop over a rollout buffer (spec §5.6, §5.10 step 5).

The loss it minimises (clipped surrogate, aggregation, k3 KL) is ript.rl.ppo_loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ript.rl.buffer import Batch, RolloutBuffer, rows
from ript.rl.ppo_loss import EPS_COUNT, PPOConfig, clipped_surrogate, k3, ppo_loss, row_weights

__all__ = ["PPOConfig", "ppo_update", "ratio_check_tolerance"]


def _chunked_backward(policy_log_prob_fn, batch: Batch, cfg: PPOConfig, micro_rows: int,
                      ref_log_prob_fn, check) -> dict[str, float]:
    """The minibatch's PPO loss, backpropagated `micro_rows` rows at a time (a 7-B policy
    cannot hold the graph of a whole minibatch, vla_spec §4.5: the original backpropagates
    per inference step). The gradient equals that of `ppo_loss` on the whole minibatch."""
    w = row_weights(batch, cfg.token_level_mean)
    n_all = batch.n_tokens
    sums = {"loss": 0.0, "clipped": 0.0, "ratio": 0.0, "k3": 0.0, "kl_ref": 0.0}
    for start in range(0, len(batch), micro_rows):
        sl = slice(start, start + micro_rows)
        logp_new = policy_log_prob_fn(rows(batch.contexts, sl), batch.tokens[sl])
        old = batch.logp_old[sl]
        check(logp_new, old)
        loss_tok, ratio, clipped = clipped_surrogate(logp_new, old, batch.advantages[sl],
                                                     cfg.clip_low, cfg.clip_high)
        part = (loss_tok.sum(-1) * w[sl]).sum()
        if cfg.kl_coef > 0.0 and ref_log_prob_fn is not None:
            with torch.no_grad():
                ref = ref_log_prob_fn(rows(batch.contexts, sl), batch.tokens[sl])
            kl = k3(ref - logp_new).sum() / (n_all + EPS_COUNT)
            part = part + cfg.kl_coef * kl
            sums["kl_ref"] += float(kl.detach())
        part.backward()
        sums["loss"] += float(part.detach())
        sums["clipped"] += float(clipped.float().sum())
        sums["ratio"] += float(ratio.sum())
        sums["k3"] += float(k3(logp_new.detach() - old).sum())
    out = {"loss": sums["loss"], "clip_frac": sums["clipped"] / n_all,
           "ratio_mean": sums["ratio"] / n_all, "approx_kl": sums["k3"] / n_all}
    if cfg.kl_coef > 0.0 and ref_log_prob_fn is not None:
        out["kl_ref"] = sums["kl_ref"]
    return out


def ppo_update(
    policy_log_prob_fn: Callable[[Tensor, Tensor], Tensor],
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    buffer: RolloutBuffer,
    cfg: PPOConfig,
    epochs: int,
    minibatch_size: int,
    grad_clip: float,
    generator: torch.Generator,
    all_reduce_grads: Callable[[list[torch.nn.Parameter]], None] | None = None,
    on_minibatch: Callable[[dict], None] | None = None,
    ref_log_prob_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ratio_check_tol: float | None = None,
    group_clips: list[tuple[list[torch.nn.Parameter], float]] | None = None,
    micro_rows: int | None = None,
) -> dict[str, float]:
    """Run ``epochs`` PPO passes over ``buffer`` (spec §5.6, §5.10 step 5).

    Per minibatch: ℓ_new = policy_log_prob_fn(contexts (N,2,d), tokens (N,n)) → (N,n);
    loss; backward; optional ``all_reduce_grads(params)`` (averages grads across ranks);
    clip_grad_norm_(params, grad_clip); optimizer step; zero grads.

    Skipping (spec §8 B16 fix): a minibatch with no valid token takes no optimizer step, so
    Adam's moments and weight decay do not move the weights without any learning signal.
    (A minibatch whose tokens are all clipped still steps, as in standard PPO.)

    Distributed (``all_reduce_grads`` given): a rank whose minibatch has no valid tokens does
    not run the policy but still joins the reduce with zero grads (every ``grad=None`` is
    zero-filled on every rank, so all ranks reduce the same tensor list and stay in
    lockstep). Replicas must stay identical, so the skip decision has to be global: the
    callback receives ``params + [flag]``, where ``flag`` is a scalar Parameter whose grad is
    1 if this rank had tokens, else 0; after the averaging reduce flag.grad > 0 iff *some*
    rank had tokens. Every rank then steps with the averaged gradient (even one that had
    only padding), or every rank skips. The callback must therefore average ``.grad`` of
    every tensor in the list it is given (e.g. ``for p in ps: all_reduce(p.grad); p.grad /=
    world``) and not assume the list is exactly the model's parameters.

    Checks: a non-finite loss or grad norm raises FloatingPointError (the caller keeps its
    last good checkpoint). Until the first optimizer step the weights equal the behaviour
    policy's, so ρ must be 1 (spec §5.5, §8 B15): the largest |ρ−1| before the first step is
    returned as ``initial_ratio_dev`` (a metric every iteration), and a deviation above
    ``ratio_check_tol`` (default: ``ratio_check_tolerance(device)``; ``inf`` disables the
    check) raises RuntimeError.

    Args:
        micro_rows: backpropagate each minibatch this many (episode, step) rows at a time
            (same gradient, bounded activation memory; None = the whole minibatch at once).
        group_clips: [(params, max_norm)]: clip each group's gradient norm separately instead
            of the global ``grad_clip`` (RIPT's OFT: LoRA and heads at 1.0 each, vla_spec
            §4.4); the reported grad_norm is then the norm over all groups before clipping.
        on_minibatch: called with a dict {epoch, minibatch, skipped, grad_norm, n_tokens,
            + ppo_loss stats when the rank had tokens} after each minibatch.
        ref_log_prob_fn: reference policy for the optional KL penalty (cfg.kl_coef > 0),
            evaluated under no_grad.

    Returns:
        Means over minibatches of loss, clip_frac, ratio_mean, approx_kl (minibatches with
        local tokens) and grad_norm (stepped minibatches), NaN when there were none; plus
        n_minibatches and n_steps_skipped.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("ppo_update needs at least one trainable parameter")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    device = params[0].device
    max_norm = float("inf") if grad_clip is None or grad_clip <= 0 else float(grad_clip)
    use_ref = cfg.kl_coef > 0.0 and ref_log_prob_fn is not None
    tol = ratio_check_tolerance(device) if ratio_check_tol is None else ratio_check_tol
    initial_dev = 0.0

    def _clear_grads() -> None:
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # params may include tensors the optimizer does not hold
            p.grad = None

    # Global "some rank had tokens" indicator, reduced alongside the grads (see docstring).
    flag = torch.nn.Parameter(torch.zeros((), device=device, dtype=params[0].dtype))
    sums: dict[str, float] = {}
    n_loss_mb = n_stepped = n_mb = n_skipped = 0
    grad_norm_sum = 0.0
    stepped_once = False
    _clear_grads()

    def check(logp_new, logp_old) -> None:
        """Until the first step ρ must be 1 (spec §5.5, §8 B15); records the largest |ρ−1|."""
        nonlocal initial_dev
        if stepped_once:
            return
        dev_max = float((logp_new.detach() - logp_old).exp().sub(1).abs().max())
        initial_dev = max(initial_dev, dev_max)
        if dev_max > tol:
            _clear_grads()
            raise RuntimeError(
                f"PPO ratio is not 1 before the first update (max |ρ−1| = "
                f"{dev_max:.3g} > {tol:g}): the recomputed log-probs "
                "differ from the stored behaviour log-probs. Is the policy in "
                "train mode (dropout on; call .eval() for the PPO phase), were its "
                "weights changed since sampling, or were ℓ_old stored from a "
                "truncated (top-k) distribution? (spec §5.5, §8 B12, B15)"
            )

    for epoch in range(epochs):
        for mb, batch in enumerate(buffer.minibatches(minibatch_size, generator)):
            n_mb += 1
            batch = batch.to(device)
            has_tokens = batch.n_tokens > 0
            stats: dict[str, float] = {}
            if has_tokens:
                if micro_rows is not None and len(batch) > micro_rows:
                    stats = _chunked_backward(policy_log_prob_fn, batch, cfg, micro_rows,
                                              ref_log_prob_fn if use_ref else None, check)
                else:
                    logp_new = policy_log_prob_fn(batch.contexts, batch.tokens)
                    logp_ref = None
                    if use_ref:
                        with torch.no_grad():
                            logp_ref = ref_log_prob_fn(batch.contexts, batch.tokens)
                    loss, stats = ppo_loss(logp_new, batch, cfg, logp_ref)
                    check(logp_new, batch.logp_old)
                    if math.isfinite(stats["loss"]):
                        loss.backward()
                if not math.isfinite(stats["loss"]):
                    _clear_grads()
                    raise FloatingPointError(
                        f"non-finite PPO loss {stats['loss']} (epoch {epoch}, minibatch {mb})"
                    )
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_loss_mb += 1

            if all_reduce_grads is not None:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                flag.grad = torch.full_like(flag, 1.0 if has_tokens else 0.0)
                all_reduce_grads(params + [flag])
                any_tokens = float(flag.grad) > 0.0
            else:
                any_tokens = has_tokens
            # The pre-clip global norm (0 when no parameter has a gradient).
            if group_clips:
                norms = [float(torch.nn.utils.clip_grad_norm_(g, c)) for g, c in group_clips]
                grad_norm = math.sqrt(sum(n * n for n in norms))
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm):
                _clear_grads()
                raise FloatingPointError(
                    f"non-finite gradient norm (epoch {epoch}, minibatch {mb})"
                )
            skipped = not any_tokens
            if skipped:
                n_skipped += 1
            else:
                optimizer.step()
                stepped_once = True
                n_stepped += 1
                grad_norm_sum += grad_norm
            _clear_grads()
            if on_minibatch is not None:
                on_minibatch(
                    {
                        "epoch": epoch,
                        "minibatch": mb,
                        "skipped": skipped,
                        "grad_norm": grad_norm,
                        "n_tokens": batch.n_tokens,
                        **stats,
                    }
                )

    nan = float("nan")
    out = {k: (v / n_loss_mb if n_loss_mb else nan) for k, v in sums.items()}
    for k in ("loss", "clip_frac", "ratio_mean", "approx_kl"):
        out.setdefault(k, nan)
    out["grad_norm"] = grad_norm_sum / n_stepped if n_stepped else nan
    out["n_minibatches"] = n_mb
    out["n_steps_skipped"] = n_skipped
    out["initial_ratio_dev"] = initial_dev
    return out


def ratio_check_tolerance(device: torch.device | str) -> float:
    """Largest |ρ−1| before the first update that is float noise rather than a bug (§8 B15).

    Sampling scores tokens in the KV-cached incremental pass, PPO recomputes them in one full
    pass: the same maths in another summation order. In float32 on a CPU that moves log-probs
    by ~1e-6, so 1e-4 leaves margin. On a GPU, TF32 matmuls (10-bit mantissa, ~5e-4
    relative) and bf16 (8-bit, ~4e-3) move logits of magnitude ~10 by 5e-3 to 4e-2, so |ρ−1|
    of a few 1e-2 is noise there; 0.1 still catches what the check is for (dropout left on,
    weights changed since sampling, ℓ_old from another distribution: |ρ−1| of 0.2 and more
    on some token of a minibatch).
    """
    return 1e-4 if torch.device(device).type == "cpu" else 0.1
