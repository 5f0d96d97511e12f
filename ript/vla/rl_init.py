"""RIPT's starting policy from an OpenVLA-family checkpoint (issue #15): OpenVLA-OFT as the
Laplace policy of ript.vla.rl, OpenVLA as the token policy of ript.vla.rl_openvla."""

from __future__ import annotations

from pathlib import Path

import torch

from ript.vla.rl import SCALE_HEAD_FILE, OFTRLPolicy
from ript.vla.rl_openvla import OpenVLARLPolicy


def rl_policy(checkpoint, block: dict, cfg, *, scale_head=None, seed: int = 0,
              device="cpu") -> tuple[OFTRLPolicy | OpenVLARLPolicy, dict]:
    """RIPT's starting policy: the checkpoint (a manifest or folder), `block` = the config's
    `policy` block + `benchmark`/`suite`, `cfg` = the `ript` block (scale factor, LoRA), the
    scale head from `scale_head` (the stage's file) or else the folder's released one. An
    OpenVLA (discrete) checkpoint gives `ript.vla.rl_openvla.OpenVLARLPolicy`."""
    from ript.envs.benchmark import get
    from ript.vla.checkpoint import checkpoint_folder, load_checkpoint, unnorm_key

    bench = get(block["benchmark"], block.get("suite"))
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    ckpt = load_checkpoint(checkpoint_folder(checkpoint), device=device, dtype=dtype,
                           adapter=None)  # merged already (ript.vla.policy.load_vla)
    key = block.get("unnorm_key") or unnorm_key(ckpt.norm_stats, block.get("suite")
                                                or bench.name)
    if ckpt.family == "openvla":  # the discrete family: token-level PPO, no heads
        policy = OpenVLARLPolicy(ckpt, bench, bench.all_task_names(), key,
                                 center_crop=block.get("center_crop", True),
                                 lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                 lora_seed=seed)
        return policy, policy.meta
    head = Path(scale_head) if scale_head else ckpt.folder / SCALE_HEAD_FILE
    if not head.is_file():  # never a silent fresh head: b ≈ e^-3 would be a different policy
        raise FileNotFoundError(f"no Laplace scale head at {head}: train one (scale_head.source: "
                                f"train) or put RIPT's released {SCALE_HEAD_FILE} there")
    policy = OFTRLPolicy(ckpt, bench, bench.all_task_names(), key,
                         center_crop=block.get("center_crop", True),
                         scale_factor=cfg.scale_factor, scale_head=head,
                         train_scale_head=cfg.train_scale_head, lora_rank=cfg.lora_rank,
                         lora_alpha=cfg.lora_alpha, lora_seed=seed)
    return policy, policy.meta
