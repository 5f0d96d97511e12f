"""Writing a checkpoint folder in the official OpenVLA(-OFT) layout (vla_spec §1.2-1.5, §3.6,
§4.1): sharded safetensors + index, config.json, preprocessor_config.json, dataset_statistics.json,
a tokenizer, OFT's head files with DDP `module.` prefixes, RIPT's scale_header.pth.

The inverse of `ript.vla.checkpoint.load_checkpoint`, for the models we make: the FAKE test
checkpoints (ript.vla.fake) and the CPU-sized models trained from scratch (ript.vla.sft). Their
tokenizer is a small Unigram model with Llama-2's special ids, not Llama-2's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ript.vla.checkpoint import ACTION_HEAD_GLOB, PROPRIO_GLOB
from ript.vla.prismatic import (CONSTANTS_FIELD, FAKE_OVERRIDES_FIELD, FUSED_ARCH,
                                official_key)

DINO_ID, SIGLIP_ID = "vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"

STEP = 150000  # the file step of OFT's spatial / object / libero-10 repos (§3.6)

# DINOv2 normalisation as the official preprocessor_config.json stores it: rounded to bf16 (§1.5)
TVF_DINO = {"mean": [0.484375, 0.455078125, 0.40625],
            "std": [0.228515625, 0.2236328125, 0.224609375]}
WORDS = ("In What action should the robot take to Out put pick up place it on and of a the black "
         "white red yellow bowl plate open close drawer top middle bottom turn stove wine bottle "
         "rack cabinet cream cheese ketchup basket alphabet soup tomato sauce butter milk orange "
         "juice salad dressing bbq between next ramekin cookie box wooden flat push front back "
         "left right both mug microwave book caddy table sink pot frying pan").split()


def save_pt(obj, path: Path) -> None:
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


def _preprocessor_config(size: int = 224) -> dict:
    resize = {"antialias": True, "interpolation": 3, "max_size": None, "size": [size, size]}
    return {"image_processor_type": "PrismaticImageProcessor",
            "processor_class": "PrismaticProcessor", "image_resize_strategy": "resize-naive",
            "use_fused_vision_backbone": True, "input_sizes": [[3, size, size]] * 2,
            "interpolations": ["bicubic", "bicubic"],
            "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
            "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
            "tvf_resize_params": [resize, resize],
            "tvf_crop_params": [{"output_size": [size, size]}] * 2,
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


def small_config(hidden: int = 64, layers: int = 2, heads: int = 4, vit_widths=(32, 48),
                 vit_heads=(2, 4), vit_depth: int = 3, image_size: int = 224,
                 patch_size: int | None = None, constants: dict | None = None) -> dict:
    """config.json of a small Prismatic VLA: every official field (§1.3), the official timm ids
    shrunk by `ript_fake_timm_overrides` (width, depth, heads; patch size if given), and OFT's
    per-platform constants where they are not LIBERO's."""
    vit = [{"embed_dim": w, "depth": vit_depth, "num_heads": h}
           for w, h in zip(vit_widths, vit_heads)]
    if patch_size is not None:
        vit = [{**v, "patch_size": patch_size} for v in vit]
    config = {
        "architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
        FAKE_OVERRIDES_FIELD: {"featurizer": vit[0], "fused_featurizer": vit[1]},
        "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": FUSED_ARCH, "use_fused_vision_backbone": True,
        "timm_model_ids": [DINO_ID, SIGLIP_ID], "timm_override_act_layers": [None, None],
        "image_sizes": [image_size, image_size], "image_resize_strategy": "resize-naive",
        "hf_llm_id": "meta-llama/Llama-2-7b-hf", "llm_max_length": 2048, "pad_token_id": 32000,
        "pad_to_multiple_of": 64, "output_projector_states": False, "n_action_bins": 256,
        "norm_stats": {},
        "text_config": {"model_type": "llama", "hidden_size": hidden,
                        "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                        "num_attention_heads": heads, "num_key_value_heads": heads,
                        "vocab_size": 32064, "pad_token_id": 32000, "torch_dtype": "bfloat16"},
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    }
    if constants:
        config[CONSTANTS_FIELD] = dict(constants)
    return config


def write_checkpoint(folder: str | Path, config: dict, model, stats: dict[str, dict], *,
                     action_head=None, proprio_projector=None, scale_head=None,
                     n_shards: int = 1, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`model` (PrismaticVLA) and its heads as a checkpoint folder; `stats` = the
    dataset_statistics.json entries ({key: {action, proprio, ...}}). Heads are stored in
    `dtype` as OFT stores them (bf16), the proprio projector in float32 as OFT's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {official_key(k): v.detach().to("cpu", dtype).contiguous()
             for k, v in model.state_dict().items()}
    _write_shards(folder, state, n_shards)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000}, indent=2))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_config(config.get("image_sizes", [224])[0]), indent=2))
    (folder / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    write_tokenizer(folder)
    if action_head is not None:
        save_pt({f"module.{k}": v.detach().to("cpu", dtype)
                 for k, v in action_head.state_dict().items()},
                folder / ACTION_HEAD_GLOB.replace("*", str(STEP)))
    if proprio_projector is not None:
        state = proprio_projector.state_dict()
        save_pt({f"module.{k}": v.detach().cpu() for k, v in state.items()},
                folder / PROPRIO_GLOB.replace("*", str(STEP)))
    if scale_head is not None:
        save_pt(scale_head.ript_state(), folder / "scale_header.pth")
    return folder

