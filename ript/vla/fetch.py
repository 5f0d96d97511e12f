"""Stage 'vla-checkpoint': make a local OpenVLA / OpenVLA-OFT checkpoint folder ready.

VLA stages load their checkpoint from a local folder, never downloading or running remote code at
load time (vla_spec §1); RIPT's `checkpoint_path` is the downloaded OFT folder (§6, ript-vla#16).
This stage checks the folder against the official layout without importing torch: config.json of
model_type "openvla" (§1.3), the safetensors shards and index (§1.2; headers vs sizes catch
truncated copies), the tokenizer (§1.4), for OFT the proprio projector of the action head's step
(§3.6). What is missing comes from the Hugging Face repo (`snapshot_download`: resumed on re-runs,
sizes checked by the client, LFS files' SHA-256 by us against the hub's listing); then a manifest
is written for later rules. A complete folder is never written to (§3.6: OFT's loader rewrites
config.json). No network, an unknown or a gated repo end in one message: the folder, the files it
lacks, and the command that fills it on a machine with a network.

    python -m ript.vla.fetch --folder checkpoints/openvla-7b-oft-finetuned-libero-spatial \\
        --repo moojink/openvla-7b-oft-finetuned-libero-spatial --revision main \\
        --out results/x/checkpoint/manifest.json --experiment-dir results/x [--no-download]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ript.utils import atomic_path, file_sha256, progress_enabled
from ript.vla.folder import STATS, family, manifest

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
HEAD = re.compile(r"action_head--(.+)_checkpoint\.pt")  # OFT's heads are saved per step (§3.6)


class FetchError(Exception):
    """An expected failure (incomplete folder, no network, unknown or gated repo): one message."""


def _json(folder: Path, name: str) -> tuple[dict | None, str | None]:
    """(content, None), or (None, what is wrong: the bare name if the file is absent)."""
    path = folder / name
    if not path.is_file():
        return None, name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{name} (unreadable: {e})"
    return (data, None) if isinstance(data, dict) else (None, f"{name} (not a JSON object)")


def _damage(path: Path) -> str | None:
    """What is wrong with a safetensors file: its size must be 8 + header + the last tensor's end
    offset. This reads only the header, so it stays fast for 5 GB shards."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                return f"truncated: {size} bytes"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file"
    want = 8 + n + end
    return None if size == want else f"{size} bytes, its header says {want}: truncated or corrupt"


def _weight_file(folder: Path, name: str) -> list[str]:
    if not (folder / name).is_file():
        return [name]
    damage = _damage(folder / name)
    return [f"{name} ({damage})"] if damage else []


def missing_files(folder: str | Path) -> list[str]:
    """What the checkpoint folder lacks (names, with the reason when a file is present but
    unusable); [] if it is complete. Reads the JSON files and the shard headers, nothing else."""
    d = Path(folder)
    missing = []
    cfg, problem = _json(d, "config.json")
    if problem:
        missing.append(problem)
    elif cfg.get("model_type") != "openvla":
        missing.append(f"config.json (model_type {cfg.get('model_type')!r}, expected 'openvla')")
    index, problem = _json(d, INDEX)
    if index is not None:
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing += [f"{INDEX} (lists no shards)"] if not shards else []
        for shard in shards:
            missing += _weight_file(d, shard)
    elif problem == INDEX and (d / SINGLE).is_file():
        missing += _weight_file(d, SINGLE)
    else:
        missing.append(problem if problem != INDEX else f"{INDEX} and its shards (or {SINGLE})")
    if not (d / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        missing.append("tokenizer.json (or tokenizer.model)")
    for head in sorted(d.glob("action_head--*_checkpoint.pt")):
        proprio = f"proprio_projector--{HEAD.fullmatch(head.name).group(1)}_checkpoint.pt"
        if not (d / proprio).is_file():
            missing.append(proprio)
    _, problem = _json(d, STATS)  # optional: config.json's norm_stats are the fallback
    if problem and problem != STATS:
        missing.append(problem)
    elif problem and cfg is not None and not cfg.get("norm_stats"):
        missing.append(f"{STATS} (config.json has no norm_stats to unnormalise actions)")
    return missing


def hint(folder: str, repo: str | None, revision: str, missing: list[str], reason: str) -> str:
    """The message for a folder that stays incomplete: what to put where, from which repo."""
    src = f"https://huggingface.co/{repo}" if repo else "its Hugging Face repo (pass --repo)"
    cmd = f"hf download {repo or '<repo>'} --revision {revision} --local-dir {folder}"
    if family(folder) == "openvla":  # an empty folder cannot tell: say what OFT adds
        missing = [*missing, "for OpenVLA-OFT also action_head--<step>_checkpoint.pt and "
                             "proprio_projector--<step>_checkpoint.pt"]
    return (f"checkpoint folder {folder} is incomplete ({reason}); missing: {'; '.join(missing)}. "
            f"Fill it by hand from {src}: on a machine with a network run `{cmd}` "
            f"(`huggingface-cli download` before huggingface_hub 1.0) and copy the folder here.")


def _why(e: Exception, repo: str) -> str:
    from huggingface_hub.errors import GatedRepoError

    def line(x: BaseException) -> str:  # the first line: huggingface_hub adds "see ..." lines
        return f"{type(x).__name__}: {(str(x).strip().splitlines() or [''])[0]}"

    cause = e.__cause__ if e.__cause__ is not None and str(e.__cause__) != str(e) else None
    text = line(e) + (f"; {line(cause)}" if cause is not None else "")
    if isinstance(e, GatedRepoError):
        text += (f"; accept its conditions at https://huggingface.co/{repo}, then log in "
                 f"(`hf auth login`) or set HF_TOKEN")
    return text


class _Bar(tqdm):
    """huggingface_hub's byte bars, shown only where ours are (ript.utils.progress_enabled)."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)  # huggingface_hub's own tqdm class takes a group name
        kwargs["disable"] = not progress_enabled()
        super().__init__(*args, **kwargs)


def download(folder: str | Path, repo: str, commit: str, api) -> None:
    """Fill `folder` with the repo at `commit`, then check every file against the hub's listing:
    its size, and the SHA-256 of LFS files. A file that fails the check is deleted, so a re-run
    fetches it again. Files already present from an earlier run are not downloaded again."""
    from huggingface_hub import RepoFile, snapshot_download

    snapshot_download(repo, revision=commit, local_dir=folder, endpoint=api.endpoint,
                      tqdm_class=_Bar)
    for f in api.list_repo_tree(repo, recursive=True, revision=commit):
        if not isinstance(f, RepoFile):
            continue
        path = Path(folder) / f.path
        if path.stat().st_size != f.size or (f.lfs is not None
                                             and file_sha256(path) != f.lfs.sha256):
            path.unlink()
            raise FetchError(f"{path}: size or SHA-256 differs from the hub's listing of {repo} at "
                             f"{commit} (damaged in transfer); the file was deleted, run again")


def run(a: argparse.Namespace) -> dict:
    """Check the folder, download what it lacks if allowed, and write the manifest to `a.out`."""
    from ript.stage import stage_tracker

    folder, commit = Path(a.folder), None
    missing = missing_files(folder)
    fam = family(folder)
    if missing and (a.no_download or not a.repo):
        raise FetchError(hint(a.folder, a.repo, a.revision, missing,
                              "--no-download given" if a.no_download else "no --repo given"))
    if missing:
        from huggingface_hub import HfApi

        # HF_ENDPOINT read now, not at huggingface_hub's import (like ript.data.libero_data)
        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        try:  # the commit pins the download; the file names tell the family before it starts
            info = api.model_info(a.repo, revision=a.revision)
        except Exception as e:
            raise FetchError(hint(a.folder, a.repo, a.revision, missing,
                                  f"looking up {a.repo} at {api.endpoint} failed: "
                                  f"{_why(e, a.repo)}")) from None
        commit = info.sha
        fam = ("openvla_oft" if any(HEAD.fullmatch(s.rfilename) for s in info.siblings or [])
               else "openvla")
    out = Path(a.out)
    params = {"folder": a.folder, "repo": a.repo, "revision": a.revision, "family": fam}
    with stage_tracker(a, "vla-checkpoint", params, metrics=out.parent / "metrics.jsonl") as tr:
        if missing:
            try:
                download(folder, a.repo, commit, api)
            except FetchError:
                raise
            except Exception as e:
                raise FetchError(hint(a.folder, a.repo, a.revision, missing_files(folder),
                                      f"download from {api.endpoint} failed: "
                                      f"{_why(e, a.repo)}")) from None
            if still := missing_files(folder):
                raise FetchError(hint(a.folder, a.repo, a.revision, still,
                                      f"{a.repo} at commit {commit} does not hold them"))
        m = manifest(a.folder, a.repo, a.revision, commit)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(m, indent=1) + "\n")
        tr.log_metrics({"total_bytes": m["total_bytes"], "n_files": len(m["files"])}, step=0)
        tr.set_tags({"norm_stats": m["norm_stats"], "commit": commit or ""})
        tr.log_artifact(out)
    return m


def main(argv=None) -> None:
    from ript.stage import add_common_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, config=False)
    p.add_argument("--folder", required=True, help="the local checkpoint folder")
    p.add_argument("--repo", default=None, help="Hugging Face model repo (owner/name) to fill it")
    p.add_argument("--revision", default="main", help="branch, tag or commit of --repo")
    p.add_argument("--no-download", action="store_true", help="only check the folder")
    p.add_argument("--out", required=True, help="manifest (JSON) to write")
    a = p.parse_args(argv)
    try:
        m = run(a)
    except FetchError as e:
        sys.exit(f"vla-checkpoint: {e}")
    print(json.dumps({k: m[k] for k in ("folder", "family", "norm_stats", "total_bytes")}))


if __name__ == "__main__":
    main()
