"""Loading an OpenVLA / OpenVLA-OFT checkpoint folder without remote code (vla_spec §1-3, §3.6).

The folder is the official HF layout: `config.json` (model_type "openvla"), safetensors weights
(shards + `model.safetensors.index.json`, or one `model.safetensors`), the tokenizer files,
`preprocessor_config.json`, `dataset_statistics.json` and, for OFT, `action_head--*_checkpoint.pt`
and `proprio_projector--*_checkpoint.pt` (saved from DDP: keys start with `module.`).

What the loader guarantees:
  * a strict key check: the file keys must equal our modules' keys after the LayerScale rename
    (§1.1) with equal shapes; anything else raises a one-line `CheckpointFolderError` naming the
    keys (first few + count) and the folder, before any weight is read;
  * read-only and offline: nothing is written into the folder (OFT's own loader rewrites
    config.json and copies code into it, §3.6) and nothing is fetched (local paths only,
    `local_files_only=True`);
  * the model is built on the meta device and the weights are assigned, so a 7-B checkpoint costs
    one copy of its weights, in `dtype` (float32 on CPU, bfloat16 elsewhere by default).

`dataset_statistics.json` replaces the config's `norm_stats` (§2). The image normalisation is the
`tvf_normalize_params` of `preprocessor_config.json` verbatim (bf16-rounded DINO values, §1.5),
else its `means`/`stds`, else the standard values.

A PEFT LoRA in `lora_adapter/` is merged when `adapter="auto"` finds one. Caution: a run folder
written by OFT's finetune.py holds the weights *already merged* with that very adapter (§3.6), so
for such a folder pass `adapter=None`, or the LoRA would count twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ript.vla.heads import L1RegressionActionHead, ProprioProjector
from ript.vla.prismatic import PrismaticVLA, local_key, official_key

DEFAULT_MEANS = ((0.485, 0.456, 0.406), (0.5, 0.5, 0.5))  # DINOv2 (ImageNet), SigLIP
DEFAULT_STDS = ((0.229, 0.224, 0.225), (0.5, 0.5, 0.5))
ACTION_HEAD_GLOB = "action_head--*_checkpoint.pt"
PROPRIO_GLOB = "proprio_projector--*_checkpoint.pt"
ADAPTER_DIR = "lora_adapter"


class CheckpointFolderError(ValueError):
    """A folder is not a loadable OpenVLA checkpoint, or does not match its own config."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """Per-backbone normalisation (DINOv2 first) after a resize to `size` (§1.5)."""

    size: int
    means: tuple[tuple[float, ...], ...]
    stds: tuple[tuple[float, ...], ...]
    interpolation: str
    source: str  # "tvf_normalize_params", "means/stds" or "default"


@dataclass
class VLACheckpoint:
    model: PrismaticVLA
    family: str  # "openvla" (discrete tokens, §2) or "openvla_oft" (L1 head, §3)
    tokenizer: Any
    norm_stats: dict
    image: ImagePreprocessing
    action_head: L1RegressionActionHead | None
    proprio_projector: ProprioProjector | None
    folder: Path
    config: dict
    adapter: Path | None  # the LoRA merged into `model`, if any

    @property
    def image_norm(self) -> dict:
        """{"means": [DINOv2, SigLIP], "stds": [...]}, as ript.vla.processing takes them."""
        return {"means": [list(m) for m in self.image.means],
                "stds": [list(s) for s in self.image.stds]}


def _fail(folder: Path, what: str) -> None:
    raise CheckpointFolderError(f"{folder}: {' '.join(str(what).split())}")


def _few(keys: list[str], n: int = 4) -> str:
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def check_keys(expected: dict[str, tuple], found: dict[str, tuple], where: str,
               folder: Path) -> None:
    """Strict key set and shapes, one line naming what differs."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in sorted(expected.keys() & found.keys())
             if tuple(found[k]) != tuple(expected[k])]
    parts = [f"{label} {_few(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected),
              ("wrong shapes (file vs model)", wrong)) if keys]
    if parts:
        _fail(folder, f"{where} does not match the model its config.json describes: "
                      + "; ".join(parts))


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        _fail(folder, "not a directory")
    path = folder / "config.json"
    if not path.is_file():
        _fail(folder, "no config.json, so not an OpenVLA checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        _fail(folder, f"config.json unreadable ({e})")
    if config.get("model_type") != "openvla":
        _fail(folder, f"config.json has model_type {config.get('model_type')!r}, not 'openvla'")
    absent = [k for k in ("text_config", "timm_model_ids") if k not in config]
    if absent:
        _fail(folder, f"config.json lacks {', '.join(absent)}")
    return config


def weight_shapes(folder: Path) -> tuple[dict[str, tuple], dict[str, Path]]:
    """Every stored key's shape and file, from the safetensors headers (no tensor is read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            _fail(folder, f"model.safetensors.index.json names absent shards {_few(absent)}")
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, [folder / "model.safetensors"]
    else:
        _fail(folder, "no weights: neither model.safetensors.index.json nor model.safetensors")
    shapes, where = {}, {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                shapes[k], where[k] = tuple(h.get_slice(k).get_shape()), f
    if weight_map is not None:
        stray = sorted(k for k in weight_map.keys() | where.keys()
                       if k not in where or weight_map.get(k) != where[k].name)
        if stray:
            _fail(folder, f"model.safetensors.index.json disagrees with its shards on keys "
                          f"{_few(stray)}")
    return shapes, where


def _component(path: Path, module: nn.Module, folder: Path, device, dtype) -> nn.Module:
    """An OFT head file (DDP keys, `module.` stripped) into a meta-built module, strictly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the folder's problem
        _fail(folder, f"{path.name} unreadable ({type(e).__name__}: {e})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    check_keys({k: tuple(v.shape) for k, v in module.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()}, path.name, folder)
    module.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    return module.eval()


def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        _fail(folder, f"several {pattern} files: {', '.join(f.name for f in found)}")
    return found[0] if found else None


def image_preprocessing(folder: Path, config: dict) -> ImagePreprocessing:
    size = int(config.get("image_sizes", [224])[0])
    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.is_file() else {}
    interpolation = (pre.get("interpolations") or ["bicubic"])[0]
    if pre.get("tvf_normalize_params"):
        params = pre["tvf_normalize_params"]
        means = tuple(tuple(p["mean"]) for p in params)
        stds = tuple(tuple(p["std"]) for p in params)
        return ImagePreprocessing(size, means, stds, interpolation, "tvf_normalize_params")
    if pre.get("means") and pre.get("stds"):
        return ImagePreprocessing(size, tuple(map(tuple, pre["means"])),
                                  tuple(map(tuple, pre["stds"])), interpolation, "means/stds")
    return ImagePreprocessing(size, DEFAULT_MEANS, DEFAULT_STDS, interpolation, "default")


def _merge_adapter(model: PrismaticVLA, path: Path, folder: Path) -> PrismaticVLA:
    from peft import PeftModel

    if not (path / "adapter_config.json").is_file():
        _fail(folder, f"LoRA adapter {path} has no adapter_config.json")
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=False).merge_and_unload()
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        _fail(folder, f"LoRA adapter {path.name} does not fit the model ({e})")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and frowns at "openvla"
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        _fail(folder, f"no loadable tokenizer ({e})")
    finally:
        hf_logging.set_verbosity(level)


def load_checkpoint(folder: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, adapter: str | Path | None = "auto",
                    attn_implementation: str = "sdpa") -> VLACheckpoint:
    """The model, heads, tokenizer and statistics of a checkpoint folder (see module doc).
    `adapter`: "auto" merges `lora_adapter/` when present, None skips it, a path names one."""
    folder = Path(folder).resolve()
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    config = read_config(folder)
    shapes, where = weight_shapes(folder)
    try:
        with torch.device("meta"):
            model = PrismaticVLA(config, attn_implementation=attn_implementation)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        _fail(folder, f"config.json does not describe a buildable model ({e})")
    check_keys({official_key(k): tuple(v.shape) for k, v in model.state_dict().items()}, shapes,
               "the safetensors weights", folder)
    state = {}
    for f in sorted(set(where.values())):
        with safe_open(f, framework="pt", device="cpu") as h:
            for k in h.keys():
                state[local_key(k)] = h.get_tensor(k).to(device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    lm = model.language_model.model  # its rotary tables are buffers, not weights: rebuild them
    lm.rotary_emb = type(lm.rotary_emb)(model.language_model.config).to(device)
    model.eval()

    adapter_path = None
    if adapter == "auto":
        adapter_path = folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else None
    elif adapter is not None:
        adapter_path = Path(adapter).resolve()
    if adapter_path is not None:
        model = _merge_adapter(model, adapter_path, folder)

    hidden = model.hidden_size
    head_file, proprio_file = _one(folder, ACTION_HEAD_GLOB), _one(folder, PROPRIO_GLOB)
    with torch.device("meta"):
        head = L1RegressionActionHead(hidden, model.action_dim)
        proprio = ProprioProjector(hidden, model.proprio_dim)
    head = head_file and _component(head_file, head, folder, device, dtype)
    proprio = proprio_file and _component(proprio_file, proprio, folder, device, dtype)

    tokenizer = _tokenizer(folder)
    stats = folder / "dataset_statistics.json"
    norm_stats = json.loads(stats.read_text()) if stats.is_file() else config.get("norm_stats", {})
    return VLACheckpoint(model=model, family="openvla_oft" if head is not None else "openvla",
                         tokenizer=tokenizer, norm_stats=norm_stats,
                         image=image_preprocessing(folder, config), action_head=head,
                         proprio_projector=proprio, folder=folder, config=config,
                         adapter=adapter_path)


def checkpoint_folder(path: str | Path) -> Path:
    """The folder a fetch or scratch-SFT manifest (JSON) names; a folder is itself."""
    path = Path(path)
    return Path(json.loads(path.read_text())["folder"]) if path.is_file() else path


def unnorm_key(norm_stats: dict, suite: str) -> str:
    """The statistics key of a task suite: `suite`, else `{suite}_no_noops` (§2)."""
    for key in (suite, f"{suite}_no_noops"):
        if key in norm_stats:
            return key
    raise ValueError(f"no normalisation statistics for {suite!r} (nor {suite}_no_noops); the "
                     f"checkpoint has: {', '.join(sorted(norm_stats)) or 'none'}")
