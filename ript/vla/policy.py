"""OpenVLA and OpenVLA-OFT behind the Policy interface (`ript.policy`), for a benchmark's runner.

The runner hands every tick's observations of all running slots to `act`; slots whose action
queue is empty are replanned in one batched model call per instruction (a batch shares its
prompt, so no padding enters the model: batched OpenVLA with right padding is unsafe,
vla_spec §6 openvla#189). The queue holds OFT's 8-step chunk (open loop, vla_spec §3.5) or
OpenVLA's single action (vla_spec §2). What is the benchmark's comes from its `Benchmark`
(`vla_cameras`, `vla_state`, `vla_env_actions`; LIBERO's: ript/envs/libero.py, vla_spec §2,
§3.2): which renders the model sees, how the env state becomes OFT's 8-d proprio, and the
gripper convention every action leaves through.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ript.vla import processing as P

def _hwc(x) -> np.ndarray:
    """(3, H, W) channel-first uint8 (the runner's layout) -> (H, W, 3)."""
    return np.ascontiguousarray(np.asarray(x).transpose(1, 2, 0))


class VLAPolicy:
    """A loaded VLA checkpoint (`ript.vla.checkpoint.load_checkpoint`) acting in a benchmark
    (`bench`, bound to its suite).

    instructions: task id -> language instruction (the runner's task ids are the benchmark's
    task indices; `task_vocab` names them). unnorm_key: the checkpoint's statistics entry
    (vla_spec §2 `unnorm_key`). decoding (OFT): "full" = OFT's single bidirectional pass,
    "prefix" = RIPT's cached prefix then action suffix (they differ by design, vla_spec §4.3).
    """

    def __init__(self, ckpt, bench, task_names: list[str], unnorm_key: str, *,
                 center_crop: bool = True, decoding: str = "full"):
        self.ckpt = ckpt
        self.bench = bench
        self.family = ckpt.family
        self.task_vocab = list(task_names)
        self.instructions = [bench.instruction(t) for t in task_names]
        self.center_crop = center_crop
        self.decoding = decoding
        stats = ckpt.norm_stats[unnorm_key]
        self.action_stats = stats["action"]
        self.proprio_stats = stats.get("proprio")
        self.oft = self.family == "openvla_oft"
        if self.oft and self.proprio_stats is None:
            raise ValueError(f"{ckpt.folder}: statistics {unnorm_key!r} have no 'proprio' "
                             "entry, which OFT's proprio token needs (vla_spec §3.2)")
        self.chunk = ckpt.model.chunk if self.oft else 1
        self._prompts: dict[int, torch.Tensor] = {}
        self.queues: list[deque] = []

    # -- Policy interface ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.ckpt.model.parameters()).device

    def to(self, device):
        self.ckpt.model.to(device)
        for head in (self.ckpt.action_head, self.ckpt.proprio_projector):
            if head is not None:
                head.to(device)
        return self

    def eval(self):
        return self

    @property
    def replan_period(self) -> int:
        """Steps between a slot's model calls (OFT's chunk; OpenVLA queries every step)."""
        return self.chunk

    def reset(self, n_envs: int) -> None:
        self.queues = [deque() for _ in range(n_envs)]

    def reset_envs(self, idx) -> None:
        for i in np.asarray(idx).reshape(-1):
            self.queues[int(i)].clear()

    def act(self, obs: dict, task, generator=None, active=None):
        task = np.asarray(task)
        B = len(task)
        active = np.ones(B, bool) if active is None else np.asarray(active, bool)
        replan = active & np.array([len(q) == 0 for q in self.queues[:B]])
        for tid in np.unique(task[replan]):
            rows = np.flatnonzero(replan & (task == tid))
            chunk = self.predict(obs, rows, int(tid))  # (len(rows), chunk, 7) env actions
            for r, actions in zip(rows, chunk):
                self.queues[r].extend(actions)
        out = np.zeros((B, self.ckpt.model.action_dim))
        for i in np.flatnonzero(active):
            out[i] = self.queues[i].popleft()
        return out, None, replan

    # -- inference ----------------------------------------------------------------------------
    def prompt(self, tid: int) -> torch.Tensor:
        if tid not in self._prompts:
            ids = P.prompt_ids(self.ckpt.tokenizer, self.instructions[tid])
            self._prompts[tid] = torch.tensor(ids, dtype=torch.long)
        return self._prompts[tid]

    def inputs(self, obs: dict, rows) -> dict:
        """Model inputs of some slots: pixel values (n, 6·images, 224, 224) and, for OFT, the
        normalised proprio state (n, 8) (sizes of the LIBERO checkpoints)."""
        cams = self.bench.vla_cameras[:2 if self.oft else 1]
        flip = self.bench.vla_images_upside_down
        norm = self.ckpt.image_norm
        size = self.ckpt.image.size
        px = torch.stack([
            P.pixel_values([P.policy_image(_hwc(obs[c][r]), size, crop=self.center_crop,
                                           upside_down=flip) for c in cams], norm)
            for r in rows])
        out = {"pixel_values": px}
        if self.oft:
            state = self.bench.vla_state(obs, rows)
            out["proprio"] = torch.as_tensor(P.normalize_proprio(state, self.proprio_stats),
                                             dtype=torch.float32)
        return out

    @torch.no_grad()
    def normalized_chunk(self, obs: dict, rows, tid: int) -> np.ndarray:
        """(n, chunk, 7) actions in the model's normalised space."""
        model, dev = self.ckpt.model, self.device
        dtype = next(model.parameters()).dtype
        x = self.inputs(obs, rows)
        n = len(rows)
        ids = self.prompt(tid).to(dev).unsqueeze(0).expand(n, -1)
        px = x["pixel_values"].to(dev, dtype)
        if self.oft:
            hidden = model.action_hidden(ids, px, proprio=x["proprio"].to(dev, dtype),
                                         proprio_projector=self.ckpt.proprio_projector,
                                         mode=self.decoding)
            return self.ckpt.action_head(hidden).float().cpu().numpy()
        tokens = model.generate_action_tokens(ids, px, n_tokens=7)
        return P.tokens_to_actions(tokens.cpu().numpy())[:, None, :]

    def predict(self, obs: dict, rows, tid: int) -> np.ndarray:
        """(n, chunk, 7) env actions: un-normalised (OFT's +1e-8, vla_spec §2), gripper rule."""
        a = self.normalized_chunk(obs, rows, tid)
        a = P.unnormalize_actions(a, self.action_stats, eps=1e-8 if self.oft else 0.0)
        return self.bench.vla_env_actions(a)


def load_vla(checkpoint, block: dict, device) -> tuple[VLAPolicy, dict]:
    """The evaluate stage's VLA: `checkpoint` is the fetch stage's manifest (or the folder);
    `block` the config's `policy` block plus the `benchmark` and `suite` it acts in.
    -> (policy, meta) as `ript.policy.load_policy` returns them. bf16 on a GPU, float32 on the
    CPU (vla_spec §5)."""
    from ript.envs.benchmark import get
    from ript.vla.checkpoint import checkpoint_folder, load_checkpoint, unnorm_key

    folder = checkpoint_folder(checkpoint)
    bench = get(block["benchmark"], block.get("suite"))
    if not bench.vla_observations:
        raise ValueError(f"{block['family']} needs a benchmark with VLA observations; "
                         f"{bench.name} has none")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    # adapter=None: a folder written by OFT's fine-tuning holds weights already merged with its
    # lora_adapter/, which applying again would count twice (vla_spec §3.6)
    ckpt = load_checkpoint(folder, device=device, dtype=dtype, adapter=None)
    if ckpt.family != block["family"]:
        raise ValueError(f"{folder} holds an {ckpt.family} checkpoint (OFT's action head files "
                         f"{'are' if ckpt.family == 'openvla_oft' else 'are not'} there), but "
                         f"policy.family is {block['family']}")
    key = block.get("unnorm_key") or unnorm_key(ckpt.norm_stats, block.get("suite") or bench.name)
    tasks = bench.all_task_names()
    policy = VLAPolicy(ckpt, bench, tasks, key, center_crop=block.get("center_crop", True),
                       decoding=block.get("decoding", "full"))
    meta = {"obs_spec": bench.vla_obs_spec(ckpt.image.size, policy.replan_period),
            "task_names": tasks,
            "data": {"benchmark": bench.name, "suite": block.get("suite"),
                     **({"eval_variants": block["eval_variants"]}
                        if block.get("eval_variants") else {})},
            "family": ckpt.family, "unnorm_key": key}
    return policy, meta
