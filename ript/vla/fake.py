"""A FAKE OpenVLA(-OFT) checkpoint: tiny random weights in the official layout (vla_spec §5.1).

For tests and toy pipeline configs only; nothing here is a trained model, and config.json says so
(`ript_fake`). What is real: every key name and prefix of §1.2 (unused last blocks, `norm`,
SigLIP's `attn_pool`, DINOv2's `ls*.scale_factor`), vocab 32064 and the special ids (BOS 1,
EOS 2, "▁" 29871, PAD 32000, action tokens 31744-31999), 224 px images with 14 px patches (256
patches per image, so OFT's 513 visual tokens), sharded safetensors + index, the side files
(`dataset_statistics.json` keyed `{suite}_no_noops`, `preprocessor_config.json` with the
bf16-rounded `tvf_*` values, OFT's head files with DDP `module.` prefixes, RIPT's
`scale_header.pth`, an optional PEFT `lora_adapter/`) and a tokenizer that AutoTokenizer loads.
What is shrunk: the Llama (hidden 64, 2 layers) and the ViTs (width 32 / 48, depth 3, through the
test-only config field `ript_fake_timm_overrides` that the loader honours). The prompt's token ids
are NOT Llama-2's: the tokenizer is a small Unigram model padded to 32000 pieces.

Weights are drawn from a seeded generator at fan-in scale (not timm's/HF's near-zero init), so the
tiny model's outputs depend on every input. Same seed, same bytes.

    python -m ript.vla.fake <folder> --family openvla_oft --suite libero_spatial [--lora]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ript.vla.checkpoint import ADAPTER_DIR
from ript.vla.heads import L1RegressionActionHead, LaplaceScaleHead, ProprioProjector
from ript.vla.prismatic import PrismaticVLA, lora_target_modules
from ript.vla.writer import STEP, TVF_DINO, small_config, write_checkpoint  # noqa: F401

FAMILIES = ("openvla", "openvla_oft")
# LIBERO-like magnitudes (normalised-action bounds, end-effector state); made up, not measured
ACTION_STATS = {"mean": [0.15, 0.13, -0.15, -0.005, -0.01, -0.005, 0.53],
                "std": [0.41, 0.35, 0.5, 0.04, 0.065, 0.077, 0.5],
                "max": [0.9375, 0.9375, 0.9375, 0.2, 0.26, 0.36, 1.0],
                "min": [-0.9375, -0.9375, -0.9375, -0.18, -0.29, -0.33, 0.0],
                "q01": [-0.74, -0.66, -0.94, -0.11, -0.16, -0.19, 0.0],
                "q99": [0.94, 0.86, 0.94, 0.13, 0.18, 0.29, 1.0],
                "mask": [True] * 6 + [False]}
PROPRIO_STATS = {"mean": [-0.05, 0.02, 1.0, 3.05, -0.1, -0.05, 0.025, -0.025],
                 "std": [0.1, 0.15, 0.1, 0.15, 0.3, 0.2, 0.01, 0.01],
                 "max": [0.2, 0.35, 1.3, 3.6, 0.9, 0.7, 0.041, 0.0],
                 "min": [-0.3, -0.35, 0.8, 2.4, -1.3, -0.8, 0.0, -0.041],
                 "q01": [-0.25, -0.3, 0.85, 2.7, -1.1, -0.6, 0.001, -0.04],
                 "q99": [0.15, 0.3, 1.25, 3.4, 0.7, 0.5, 0.04, -0.001]}


def fake_config(suite: str, hidden: int = 64, layers: int = 2, heads: int = 4,
                vit_widths=(32, 48), vit_heads=(2, 4), vit_depth: int = 3) -> dict:
    """config.json: every official field (§1.3) plus the clearly named test-only ones."""
    other = {"action": {k: [x * 0.5 for x in v] if k != "mask" else v
                        for k, v in ACTION_STATS.items()},
             "proprio": PROPRIO_STATS, "num_transitions": 1000, "num_trajectories": 10}
    config = small_config(hidden, layers, heads, vit_widths, vit_heads, vit_depth)
    config["ript_fake"] = "FAKE: tiny random weights written by ript.vla.fake, not a trained model"
    # deliberately another key: dataset_statistics.json must replace these (§2)
    config["norm_stats"] = {"bridge_orig": other}
    return config


@torch.no_grad()
def randomise_(module: nn.Module, gen: torch.Generator) -> None:
    """Fan-in-scaled random weights, norms near 1, LayerScale O(1): a model that does something."""
    for name, p in module.named_parameters():
        if name.endswith(("pos_embed", "cls_token", "reg_token", "latent")):
            p.normal_(0.0, 0.5, generator=gen)
        elif name.endswith(("ls1.gamma", "ls2.gamma")):
            p.uniform_(0.3, 1.0, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 1.0, generator=gen)
        elif p.ndim >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.05, generator=gen)
        else:
            p.normal_(1.0, 0.1, generator=gen)


def _built(cls, *args, gen: torch.Generator, **kwargs) -> nn.Module:
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    module = module.to_empty(device="cpu")
    randomise_(module, gen)
    return module



def write_fake_checkpoint(folder: str | Path, family: str = "openvla_oft", *,
                          suite: str, seed: int = 0, hidden: int = 64,
                          layers: int = 2, heads: int = 4, lora: bool = False,
                          n_shards: int = 2) -> Path:
    """Write a FAKE checkpoint folder (see module doc); returns its path."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {FAMILIES}")
    gen = torch.Generator().manual_seed(seed)
    config = fake_config(suite, hidden, layers, heads)
    model = _built(PrismaticVLA, config, gen=gen)
    stats = {"action": ACTION_STATS, "proprio": PROPRIO_STATS, "num_transitions": 52970,
             "num_trajectories": 432}
    heads_ = {}
    if family == "openvla_oft":
        heads_["action_head"] = _built(L1RegressionActionHead, hidden, gen=gen)
        heads_["proprio_projector"] = _built(ProprioProjector, hidden, gen=gen)
        scale = _built(LaplaceScaleHead, hidden, gen=gen)
        with torch.no_grad():  # keep RIPT's init meaning: b ≈ e^-3 (§4.1)
            scale.log_b_head.weight.mul_(0.01)
            scale.log_b_head.bias.normal_(-3.0, 0.1, generator=gen)
        heads_["scale_head"] = scale
    folder = write_checkpoint(folder, config, model, {f"{suite}_no_noops": stats},
                              n_shards=n_shards, **heads_)
    if lora:
        _write_lora(model, folder / ADAPTER_DIR, seed)
    return folder


def _write_lora(model: PrismaticVLA, path: Path, seed: int) -> None:
    """A PEFT adapter (r=4) over OFT's "all-linear" targets, with non-zero B so it matters."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):  # peft draws A and B from the global RNG
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
            target_modules=lora_target_modules(model)))
    peft_model.save_pretrained(str(path))
    cfg_path = path / "adapter_config.json"  # peft writes target_modules in set (hash) order
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny FAKE OpenVLA(-OFT) checkpoint folder.")
    p.add_argument("folder", type=Path)
    p.add_argument("--family", choices=FAMILIES, default="openvla_oft")
    p.add_argument("--suite", required=True,
                   help="the task suite its statistics are for (key `<suite>_no_noops`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lora", action="store_true", help="also write a PEFT lora_adapter/")
    args = p.parse_args(argv)
    print(write_fake_checkpoint(args.folder, args.family, suite=args.suite, seed=args.seed,
                                hidden=args.hidden, lora=args.lora))


if __name__ == "__main__":
    main()
