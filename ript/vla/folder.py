"""A checkpoint folder's manifest: which files it holds, its family, where its statistics come
from (vla_spec §1.2, §3.6). Light (no torch): the fetch stage runs on a login node, and the
scratch SFT stage writes the same manifest for the folder it trains."""

from __future__ import annotations

from pathlib import Path

from ript.utils import file_sha256

STATS = "dataset_statistics.json"
BOOKKEEPING = ".cache"  # huggingface_hub's local_dir metadata: <folder>/.cache/huggingface/


def family(folder: str | Path) -> str:
    """The model family: openvla_oft if the folder holds an OFT action head (§3.6)."""
    return "openvla_oft" if any(Path(folder).glob("action_head--*_checkpoint.pt")) else "openvla"


def manifest(folder: str | Path, repo: str | None = None, revision: str | None = None,
             commit: str | None = None) -> dict:
    """A complete folder's manifest: files and sizes, and where its norm stats come from."""
    d = Path(folder)
    files = {p.relative_to(d).as_posix(): p.stat().st_size for p in d.rglob("*")
             if p.is_file() and p.relative_to(d).parts[0] != BOOKKEEPING}
    return {"folder": str(folder), "family": family(d),
            "norm_stats": STATS if (d / STATS).is_file() else "config.json",
            "files": dict(sorted(files.items())), "total_bytes": sum(files.values()),
            "config_sha256": file_sha256(d / "config.json"),
            "repo": repo, "revision": revision, "commit": commit}
