"""The OpenVLA family's config blocks: `policy`, `vla_sft`, `scale_head` (vla_spec).

Part of the one source of defaults (`ript/settings.py` holds QueST's and RIPT's blocks and
says how they are used); kept apart so that each file fits a reader's head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ript.config import require
from ript.settings import OptimConfig

SCRATCH = "scratch"  # policy.checkpoint of a VLA trained here (block vla_sft)


@dataclass
class PolicyConfig:
    """Block `policy`: the policy family. QueST is trained by stages 0-2; an OpenVLA-family
    policy is loaded from an official checkpoint folder instead (vla_spec §1, §3.6), so the DAG
    skips stages 0-2 and evaluates it."""

    family: Literal["quest", "openvla", "openvla_oft"] = "quest"
    """quest (stages 0-2 train it), openvla (256-bin action tokens) or openvla_oft (8×7 chunks
    from the L1 head)."""
    checkpoint: str | None = None
    """VLAs: local checkpoint folder in the official layout (relative to the working
    directory), filled from `hf_repo` when incomplete and `download` is on; or `scratch`:
    openvla_oft only, a CPU-sized model trained here (block vla_sft)."""
    hf_repo: str | None = None
    """VLAs: Hugging Face model repo of the checkpoint, e.g.
    moojink/openvla-7b-oft-finetuned-libero-spatial."""
    hf_revision: str = "main"
    """Branch, tag or commit of `hf_repo` (a commit pins the weights)."""
    download: bool = True
    """Download a missing or incomplete checkpoint folder; if false, it must be filled by
    hand (the fetch stage says with which files)."""
    unnorm_key: str | None = None
    """Entry of the checkpoint's dataset statistics that un-normalises actions; null = the
    suite's name, else `<suite>_no_noops` (vla_spec §2)."""
    center_crop: bool = True
    """Centre crop of 90 % area before the model (vla_spec §1.5; the LIBERO checkpoints were
    trained with random crops)."""
    decoding: Literal["full", "prefix"] = "full"
    """OFT: "full" = OFT's single bidirectional pass; "prefix" = RIPT's cached prefix, then the
    action suffix (prefix tokens do not see the actions; vla_spec §4.3)."""

    def validate(self) -> None:
        if self.family != "quest":
            require(bool(self.checkpoint), "policy.checkpoint",
                    f"{self.family} needs a local checkpoint folder (filled from policy.hf_repo "
                    "when download is on)")
            require(self.hf_repo is None or (self.hf_repo.count("/") == 1
                                             and all(self.hf_repo.split("/"))),
                    "policy.hf_repo", "must be a Hugging Face repo id, 'owner/name'")
            require(bool(self.hf_revision), "policy.hf_revision", "must not be empty")
            require(self.checkpoint != SCRATCH or self.family == "openvla_oft",
                    "policy.checkpoint", "scratch trains an OpenVLA-OFT model (L1 head); "
                    "use family openvla_oft")

    @property
    def scratch(self) -> bool:
        return self.family != "quest" and self.checkpoint == SCRATCH


@dataclass
class VlaSftConfig:
    """Block `vla_sft` (policy.checkpoint: scratch): a CPU-sized OpenVLA-OFT, the same
    architecture shrunk (two tiny ViTs, a tiny Llama, OFT's heads), trained here from scratch on
    the demonstrations by OFT's L1 recipe and written in the official folder layout (issue #15).
    The data stage must record images (data.image: true) at `image_size`."""

    hidden: int = 64
    """Llama hidden size."""
    layers: int = 2
    """Llama decoder layers."""
    heads: int = 4
    """Llama attention heads."""
    vit_widths: list[int] = field(default_factory=lambda: [32, 48])
    """Widths of the DINOv2 and the SigLIP ViT."""
    vit_heads: list[int] = field(default_factory=lambda: [2, 4])
    """Attention heads of the two ViTs."""
    vit_depth: int = 3
    """Blocks per ViT (the featurizers read block depth − 2, as the 7-B model's)."""
    image_size: int = 64
    """Side of the policy image (= data.image_size: the renders need no resize)."""
    patch_size: int = 8
    """ViT patch side ((image_size / patch_size)² visual tokens per ViT)."""
    chunk: int = 8
    """Actions per chunk (OFT's NUM_ACTIONS_CHUNK)."""
    train: OptimConfig = field(default_factory=lambda: OptimConfig(
        steps=1500, batch_size=64, lr=5e-4, lr_min=5e-5, grad_clip=1.0, checkpoint_every=250,
        log_every=25))
    """Optimisation (L1 on normalised action chunks, every weight trained)."""

    def validate(self) -> None:
        for k in ("hidden", "layers", "heads", "vit_depth", "image_size", "patch_size", "chunk"):
            require(getattr(self, k) >= 1, f"vla_sft.{k}", "must be >= 1")
        require(self.vit_depth >= 2, "vla_sft.vit_depth", "must be >= 2 (block L-2 is read)")
        require(self.image_size % self.patch_size == 0, "vla_sft.patch_size",
                "must divide image_size")
        require(self.hidden % self.heads == 0, "vla_sft.heads", "must divide hidden")
        require(len(self.vit_widths) == 2 and len(self.vit_heads) == 2, "vla_sft.vit_widths",
                "vit_widths and vit_heads list the two ViTs (DINOv2, SigLIP)")
        require(all(w % h == 0 for w, h in zip(self.vit_widths, self.vit_heads)),
                "vla_sft.vit_heads", "each must divide its ViT's width")
        self.train.validate()


@dataclass
class ScaleHeadConfig:
    """Block `scale_head` (OpenVLA-OFT RIPT): RIPT's Laplace scale head (vla_spec §4.1), trained
    here by the Laplace negative log-likelihood of the demonstrations' action chunks with the
    policy frozen (the original's SFT code was never released), or a released head file."""

    source: Literal["train", "released"] = "train"
    """train: the scale-head stage runs; released: `file` (or the checkpoint folder's
    scale_header.pth) is loaded, no stage runs."""
    file: str | None = None
    """released: a {scale_trunk, log_b_head} file; null = <checkpoint>/scale_header.pth."""
    train: OptimConfig = field(default_factory=lambda: OptimConfig(
        steps=500, batch_size=64, lr=3e-3, lr_min=3e-4, grad_clip=1.0, checkpoint_every=100,
        log_every=10))
    """Optimisation (the paper: 500 steps)."""

    def validate(self) -> None:
        self.train.validate()
