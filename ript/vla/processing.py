"""What goes into and comes out of an OpenVLA / OpenVLA-OFT model: the prompt, the images, the
normalised proprio state, and the actions (vla_spec §1.4, §1.5, §2, §3.2). What a benchmark
adds (which cameras, how its state becomes the 8-d proprio, its gripper convention) lives with
the benchmark (`Benchmark.vla_*`, ript/envs/).

Pure numpy/PIL (and torch only for the final pixel tensor), so every rule here has a
hand-computed test (tests/test_vla_processing.py).

Where we cannot match the originals bit for bit, and why:
- The originals resize with TensorFlow (`tf.image.resize`, lanczos3, antialias) after a JPEG
  round trip through TF, and centre-crop with `tf.image.crop_and_resize` (bilinear). We use PIL's
  JPEG codec (quality 95, TF's default) and PIL's LANCZOS and BILINEAR filters: same kernels, but
  not the same pixel rounding, so pixel values may differ by a few levels. TensorFlow is a 500 MB
  dependency for three image ops; a test pins our outputs' geometry and ranges, not TF's bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

# vla_spec §2: OpenVLA's action tokens are the last 256 ids of the 32000-token Llama vocabulary
# (the 64 padding ids above 32000 are never action tokens).
N_BINS = 256
VOCAB = 32000
ACTION_TOKEN_BEGIN = VOCAB - N_BINS - 1  # 31743: ids > this are action tokens (spec §3.3)
EMPTY_PIECE = 29871  # "▁", appended to a prompt that does not end in it (spec §1.4)
BINS = np.linspace(-1.0, 1.0, N_BINS)
BIN_CENTERS = (BINS[:-1] + BINS[1:]) / 2.0  # 255 centres
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CROP_AREA = 0.9  # OFT/OpenVLA centre crop keeps the central 90 % of the area (spec §1.5 step 5)


# -- prompt -------------------------------------------------------------------------------------
def prompt_text(instruction: str) -> str:
    """OpenVLA's inference prompt (spec §1.4)."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """BOS + the tokenised prompt, ending in the empty piece 29871 (spec §1.4)."""
    ids = list(tokenizer(prompt_text(instruction)).input_ids)
    if ids[-1] != EMPTY_PIECE:
        ids.append(EMPTY_PIECE)
    return ids


# -- actions ------------------------------------------------------------------------------------
def actions_to_tokens(actions) -> np.ndarray:
    """Normalised actions in [-1, 1] -> token ids (clip, digitize, VOCAB - bin; spec §2)."""
    a = np.clip(np.asarray(actions, np.float64), -1.0, 1.0)
    return VOCAB - np.digitize(a, BINS)


def tokens_to_actions(tokens) -> np.ndarray:
    """Token ids -> normalised actions at the bin centres; a non-action id clips to an extreme
    bin, as the original's unconstrained generation does (spec §2)."""
    j = np.clip(VOCAB - np.asarray(tokens, np.int64) - 1, 0, len(BIN_CENTERS) - 1)
    return BIN_CENTERS[j]


def unnormalize_actions(actions, stats: dict, eps: float = 0.0) -> np.ndarray:
    """BOUNDS_Q99: a = (a+1)/2 (q99 - q01 + eps) + q01 where `mask`, else a (spec §2).
    OpenVLA uses eps = 0, OFT 1e-8."""
    a = np.asarray(actions, np.float64)
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, bool)), bool)
    return np.where(mask, 0.5 * (a + 1.0) * (q99 - q01 + eps) + q01, a)


# -- proprio ------------------------------------------------------------------------------------
def normalize_proprio(state, stats: dict) -> np.ndarray:
    """clip(2 (s - q01) / (q99 - q01 + 1e-8) - 1, -1, 1), every dimension (spec §3.2)."""
    s = np.asarray(state, np.float64)
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    return np.clip(2.0 * (s - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0)


# -- images -------------------------------------------------------------------------------------
def jpeg_roundtrip(img: np.ndarray, quality: int = 95) -> np.ndarray:
    """Encode and decode as JPEG, as the training data were stored (spec §1.5 step 3)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def center_crop(img: np.ndarray, area: float = CROP_AREA) -> np.ndarray:
    """Crop the central `area` fraction of the image (side √area) and resize it back to the
    input size, bilinear (spec §1.5 step 5; the original's crop_and_resize)."""
    h, w = img.shape[:2]
    side = math.sqrt(area)
    ch, cw = side * h, side * w
    top, left = (h - ch) / 2.0, (w - cw) / 2.0
    box = (left, top, left + cw, top + ch)
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR, box=box))


def policy_image(frame: np.ndarray, size: int = 224, crop: bool = True,
                 upside_down: bool = True) -> np.ndarray:
    """A render (H, W, 3) uint8 -> the policy's (size, size, 3) uint8 image: rotate 180° if the
    benchmark renders upside down (LIBERO), JPEG round trip, lanczos resize, optional centre
    crop (spec §1.5 steps 1-5)."""
    img = np.ascontiguousarray(frame[::-1, ::-1] if upside_down else frame, np.uint8)
    img = jpeg_roundtrip(img)
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))
    return center_crop(img) if crop else img


def pixel_values(images: list[np.ndarray], norm: dict | None = None) -> torch.Tensor:
    """Policy images (each (224, 224, 3) uint8) -> (6·n, 224, 224) float32: per image the DINOv2
    and the SigLIP normalisation stacked on channels, images in order (spec §1.5, §3.2).
    `norm` = {"means": [dino, siglip], "stds": [dino, siglip]} from the checkpoint's
    preprocessor config (its bf16-rounded values, spec §1.5 "Subtlety")."""
    means = norm["means"] if norm else [DINO_MEAN, SIGLIP_MEAN]
    stds = norm["stds"] if norm else [DINO_STD, SIGLIP_STD]
    out = []
    for img in images:
        x = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).float() / 255.0
        for m, s in zip(means, stds):
            out.append((x - torch.tensor(m).view(3, 1, 1)) / torch.tensor(s).view(3, 1, 1))
    return torch.cat(out, 0)
