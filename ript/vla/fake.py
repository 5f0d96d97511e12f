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
from safetensors.torch import save_file
from torch import nn

from ript.vla.checkpoint import ACTION_HEAD_GLOB, ADAPTER_DIR, PROPRIO_GLOB
from ript.vla.heads import L1RegressionActionHead, LaplaceScaleHead, ProprioProjector
from ript.vla.prismatic import (FAKE_OVERRIDES_FIELD, FUSED_ARCH, PrismaticVLA,
                                lora_target_modules, official_key)

DINO_ID, SIGLIP_ID = "vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"
FAMILIES = ("openvla", "openvla_oft")
STEP = 150000  # the file step of OFT's spatial / object / libero-10 repos (§3.6)
# DINOv2 normalisation as the official preprocessor_config.json stores it: rounded to bf16 (§1.5)
TVF_DINO = {"mean": [0.484375, 0.455078125, 0.40625],
            "std": [0.228515625, 0.2236328125, 0.224609375]}
WORDS = ("In What action should the robot take to Out put pick up place it on and of a the black "
         "white red yellow bowl plate open close drawer top middle bottom turn stove wine bottle "
         "rack cabinet cream cheese ketchup basket alphabet soup tomato sauce butter milk orange "
         "juice salad dressing bbq between next ramekin cookie box wooden flat push front back "
         "left right both mug microwave book caddy table sink pot frying pan").split()
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
    return {
        "architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
        "ript_fake": "FAKE: tiny random weights written by ript.vla.fake, not a trained model",
        FAKE_OVERRIDES_FIELD: {
            "featurizer": {"embed_dim": vit_widths[0], "depth": vit_depth,
                           "num_heads": vit_heads[0]},
            "fused_featurizer": {"embed_dim": vit_widths[1], "depth": vit_depth,
                                 "num_heads": vit_heads[1]}},
        "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": FUSED_ARCH, "use_fused_vision_backbone": True,
        "timm_model_ids": [DINO_ID, SIGLIP_ID], "timm_override_act_layers": [None, None],
        "image_sizes": [224, 224], "image_resize_strategy": "resize-naive",
        "hf_llm_id": "meta-llama/Llama-2-7b-hf", "llm_max_length": 2048, "pad_token_id": 32000,
        "pad_to_multiple_of": 64, "output_projector_states": False, "n_action_bins": 256,
        # deliberately another key: dataset_statistics.json must replace these (§2)
        "norm_stats": {"bridge_orig": other},
        "text_config": {"model_type": "llama", "hidden_size": hidden,
                        "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                        "num_attention_heads": heads, "num_key_value_heads": heads,
                        "vocab_size": 32064, "pad_token_id": 32000, "torch_dtype": "bfloat16"},
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    }


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


def _save_pt(obj, path: Path) -> None:
    with open(path, "wb") as f:  # a file object: torch would name the archive after the path
        torch.save(obj, f)


def write_tokenizer(folder: Path) -> None:
    """Llama-2's special ids on a small Unigram vocab padded to 32000 pieces, plus <PAD> 32000."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{i:02X}>", -100.0) for i in range(256)]  # byte fallback at 3..258, as Llama
    chars = [chr(c) for c in range(33, 127)]
    words = [(f"▁{w}", -5.0) for w in WORDS] + [(w, -6.0) for w in WORDS]
    words += [(f"▁{c}", -8.0) for c in chars] + [(c, -9.0) for c in chars]
    seen = {p for p, _ in pieces}
    pieces += [(p, s) for p, s in dict(words).items() if p not in seen]
    pieces += [(f"<fake{i}>", -100.0) for i in range(len(pieces), 29871)]
    pieces.append(("▁", -7.0))  # 29871, the piece OpenVLA appends to every prompt (§1.4)
    pieces += [(f"<fake{i}>", -100.0) for i in range(29872, 32000)]
    tok = Tokenizer(Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right",
                                   model_max_length=2048)
    fast.add_special_tokens({"pad_token": "<PAD>"})
    assert fast.convert_tokens_to_ids(["▁", "<PAD>"]) == [29871, 32000]
    fast.save_pretrained(str(folder))


def _preprocessor_config() -> dict:
    resize = {"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}
    return {"image_processor_type": "PrismaticImageProcessor",
            "processor_class": "PrismaticProcessor", "image_resize_strategy": "resize-naive",
            "use_fused_vision_backbone": True, "input_sizes": [[3, 224, 224], [3, 224, 224]],
            "interpolations": ["bicubic", "bicubic"],
            "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
            "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
            "tvf_resize_params": [resize, resize],
            "tvf_crop_params": [{"output_size": [224, 224]}] * 2,
            "tvf_normalize_params": [{"inplace": False, **TVF_DINO},
                                     {"inplace": False, "mean": [0.5] * 3, "std": [0.5] * 3}],
            "tvf_do_letterbox": False, "tvf_letterbox_fill": None}


def _write_shards(folder: Path, state: dict[str, torch.Tensor], n_shards: int) -> None:
    keys = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map, done = {}, 0
    for k in keys:  # contiguous runs of keys, cut at equal byte counts
        weight_map[k] = names[min(n_shards - 1, done * n_shards // max(total, 1))]
        done += state[k].numel() * state[k].element_size()
    for name in names:
        save_file({k: state[k] for k in keys if weight_map[k] == name}, str(folder / name),
                  metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_fake_checkpoint(folder: str | Path, family: str = "openvla_oft", *,
                          suite: str, seed: int = 0, hidden: int = 64,
                          layers: int = 2, heads: int = 4, lora: bool = False,
                          n_shards: int = 2) -> Path:
    """Write a FAKE checkpoint folder (see module doc); returns its path."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {FAMILIES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    config = fake_config(suite, hidden, layers, heads)
    model = _built(PrismaticVLA, config, gen=gen)
    state = {official_key(k): v.to(torch.bfloat16).contiguous()
             for k, v in model.state_dict().items()}
    _write_shards(folder, state, n_shards)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2))
    stats = {"action": ACTION_STATS, "proprio": PROPRIO_STATS, "num_transitions": 52970,
             "num_trajectories": 432}
    (folder / "dataset_statistics.json").write_text(
        json.dumps({f"{suite}_no_noops": stats}, indent=2))
    write_tokenizer(folder)
    if family == "openvla_oft":
        head = _built(L1RegressionActionHead, hidden, gen=gen)
        proprio = _built(ProprioProjector, hidden, gen=gen)
        _save_pt({f"module.{k}": v.to(torch.bfloat16) for k, v in head.state_dict().items()},
                 folder / ACTION_HEAD_GLOB.replace("*", str(STEP)))
        _save_pt({f"module.{k}": v for k, v in proprio.state_dict().items()},
                 folder / PROPRIO_GLOB.replace("*", str(STEP)))
        scale = _built(LaplaceScaleHead, hidden, gen=gen)
        with torch.no_grad():  # keep RIPT's init meaning: b ≈ e^-3 (§4.1)
            scale.log_b_head.weight.mul_(0.01)
            scale.log_b_head.bias.normal_(-3.0, 0.1, generator=gen)
        _save_pt(scale.ript_state(), folder / "scale_header.pth")
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
