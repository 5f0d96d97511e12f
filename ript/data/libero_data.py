"""Stage 'data' for LIBERO: fetch, verify and subset the official demonstration files.

LIBERO's demos are published as one HDF5 file per task (spec §2.1), 50 demos each. This stage
gets the file (local copy, else a download from LIBERO's Hugging Face dataset repo with
`huggingface_hub`, checked against the hub's SHA-256), checks it (truncated files exist, LIBERO
issue #76; a file of another task must be refused), picks the few-shot subset of spec §2.2 and
writes it in our layout (ript/data/hdf5.py), each demo carrying its first MuJoCo state as the
RIPT context (spec §5.2).

    python -m ript.data.libero_data --task NAME --config '{"suite": "libero_goal"}' \\
        --out results/x/data/NAME.hdf5 --experiment-dir results/x
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from ript.config import from_dict, to_dict
from ript.data.hdf5 import FORMAT_VERSION, DataError, demo_keys
from ript.envs.libero import LiberoDataConfig
from ript.utils import atomic_path, file_sha256, progress_enabled

STAGING = ".download"  # <raw_dir>/.download/: files wait there until their checksum matches
MAX_DEMO_STEPS = 600  # RIPT's context window (spec §2.2): a longer demo adds mid-demo contexts
IMAGE_SIZE = 128
# Keys every demo must have, with their per-step shapes (spec §2.1); None = any (states: the
# MuJoCo state size differs per task).
REQUIRED = {"actions": (7,), "states": None, "obs/agentview_rgb": (IMAGE_SIZE, IMAGE_SIZE, 3),
            "obs/eye_in_hand_rgb": (IMAGE_SIZE, IMAGE_SIZE, 3), "obs/joint_states": (7,),
            "obs/gripper_states": (2,), "obs/ee_pos": (3,)}
COPIED = ("obs", "actions", "states", "rewards", "dones", "robot_states")
SHA256 = re.compile(r"[0-9a-f]{64}")




def raw_path(raw_dir: str | Path, suite: str, task: str) -> Path:
    """Where the official file of a task lies (LIBERO's own download folder layout)."""
    return Path(raw_dir) / suite / f"{task}_demo.hdf5"


def _how_to_get(cfg: LiberoDataConfig, task: str) -> str:
    return (f"Expected layout: <raw_dir>/<suite>/<task>_demo.hdf5, here "
            f"{raw_path(cfg.raw_dir, cfg.suite, task)}. To get the files by hand, run LIBERO's "
            f"`python benchmark_scripts/download_libero_datasets.py --datasets {cfg.suite} "
            f"--use-huggingface` and point data.raw_dir at the folder that holds {cfg.suite}/.")


def fetch(cfg: LiberoDataConfig, task: str) -> Path:
    """The official file of `task`: the local copy, else (if `cfg.download`) a download.

    The downloaded file is moved to `<raw_dir>/<suite>/<task>_demo.hdf5` only once complete and
    its SHA-256 matches the hub's, so that path never holds a partial or corrupt download.
    """
    path = raw_path(cfg.raw_dir, cfg.suite, task)
    if path.exists():
        return path
    if not cfg.download:
        raise DataError(f"{path}: official LIBERO file not found and data.download is false. "
                        + _how_to_get(cfg, task))
    filename = f"{cfg.suite}/{path.name}"  # the repo path, the same as ours under raw_dir
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at huggingface_hub import
    try:
        _download(cfg, filename, path, endpoint)
    except DataError:
        raise
    except Exception as e:
        c = e.__cause__  # huggingface_hub's "cannot find the file" errors wrap the real reason
        cause = f"; {type(c).__name__}: {c}" if c is not None and str(c) != str(e) else ""
        where = f" at {endpoint}" if endpoint else ""
        raise DataError(f"download of {filename} from the Hugging Face dataset "
                        f"{cfg.download_repo}{where} (revision {cfg.download_revision}) failed "
                        f"({type(e).__name__}: {e}{cause}). " + _how_to_get(cfg, task)) from None
    return path


def _download(cfg: LiberoDataConfig, filename: str, dest: Path, endpoint: str | None) -> None:
    """Download repo file `filename` to `dest`, checked against the hub's SHA-256.

    `hf_hub_download` retries, resumes a cut transfer (HTTP Range) and checks the size; it
    writes to a temporary file and moves it into its `local_dir` only when complete. Its
    `local_dir` is a staging folder beside the final path, so that a file whose checksum does
    not match never appears at `dest`.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    url = hf_hub_url(cfg.download_repo, filename, repo_type="dataset",
                     revision=cfg.download_revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)  # the commit and the file's etag
    if meta.commit_hash is None:
        raise DataError(f"{url} did not answer like a Hugging Face Hub (no X-Repo-Commit "
                        f"header); check HF_ENDPOINT and proxy settings")
    staged = Path(hf_hub_download(
        cfg.download_repo, filename, repo_type="dataset", endpoint=endpoint,
        revision=meta.commit_hash,  # the commit whose etag we hold, even if the branch moves
        local_dir=Path(cfg.raw_dir) / STAGING, tqdm_class=_Bar))
    etag = (meta.etag or "").lower()
    if SHA256.fullmatch(etag):  # LFS files (all LIBERO's): the etag is the content's SHA-256
        digest = file_sha256(staged)
        if digest != etag:
            staged.unlink(missing_ok=True)
            raise DataError(f"download of {filename} from {cfg.download_repo}: SHA-256 "
                            f"{digest} of the received file differs from the hub's {etag} "
                            f"(corrupted in transfer or on disk); the file was deleted, run "
                            f"again to download it afresh")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, dest)  # same file system: the final name appears only when verified


class _Bar(tqdm):
    """huggingface_hub's byte bar, shown only where ours are (ript.utils.progress)."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)  # huggingface_hub's own tqdm class takes a group name
        kwargs["disable"] = not progress_enabled()
        super().__init__(*args, **kwargs)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split()).rstrip(".")


def task_languages(suite: str, task: str) -> tuple[int, str, set[str]]:
    """(task id, benchmark language, accepted normalised instructions) of a task.

    The benchmark's language comes from the BDDL file *name*; the files' `problem_info` holds
    the instruction written *inside* the BDDL file, which differs for 29 of the 130 tasks (e.g.
    "open the middle drawer of the cabinet" vs "open the middle layer of the drawer"). Both
    name this task and no other, so both are accepted.
    """
    from libero.libero import get_libero_path
    from libero.libero.envs.bddl_utils import get_problem_info

    from ript.envs.libero import _suite, task_index

    tid = task_index(suite, task)
    spec = _suite(suite).get_task(tid)
    accepted = {_norm(spec.language)}
    bddl = Path(get_libero_path("bddl_files")) / spec.problem_folder / spec.bddl_file
    if bddl.exists():
        accepted.add(_norm(get_problem_info(str(bddl))["language_instruction"]))
    return tid, spec.language, accepted


def verify(path: str | Path, suite: str, task: str) -> dict:
    """Check an official file (spec §2.1) before use; every failure names the file and key."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(
            f"{path}: cannot be opened as HDF5, the file is truncated or corrupt ({e}). Delete "
            f"it and download it again (one published LIBERO-90 file is known to be truncated, "
            f"LIBERO issue #76).") from None
    with f:
        if "data" not in f:
            raise DataError(f"{path}: missing key 'data' (not a LIBERO demo file)")
        if "problem_info" not in f["data"].attrs:
            raise DataError(f"{path}: missing attribute 'data.problem_info'")
        try:
            lang = json.loads(f["data"].attrs["problem_info"])["language_instruction"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: 'data.problem_info' has no language_instruction: "
                            f"{e}") from None
        if isinstance(lang, list):  # some LIBERO versions store the token list
            lang = " ".join(lang)
        _, expected, accepted = task_languages(suite, task)
        if _norm(lang) not in accepted:
            raise DataError(f"{path}: language instruction {lang!r} does not match task {task!r} "
                            f"of {suite} ({expected!r}): a file of another task? Delete it and "
                            f"download the right one.")
        lengths, state_dim = [], None
        for key in demo_keys(f):
            g = f[f"data/{key}"]
            if "num_samples" not in g.attrs:
                raise DataError(f"{path}: missing attribute 'data/{key}.num_samples'")
            n = int(g.attrs["num_samples"])
            for name, shape in REQUIRED.items():
                if name not in g:
                    raise DataError(f"{path}: missing key 'data/{key}/{name}'")
                ds = g[name]
                if ds.shape[0] != n:
                    raise DataError(f"{path}: 'data/{key}/{name}' has {ds.shape[0]} steps, "
                                    f"num_samples says {n}")
                if shape is not None and ds.shape[1:] != shape:
                    raise DataError(f"{path}: 'data/{key}/{name}' has step shape "
                                    f"{ds.shape[1:]}, expected {shape}")
            d = g["states"].shape[1:]
            if len(d) != 1 or (state_dim is not None and d[0] != state_dim):
                raise DataError(f"{path}: 'data/{key}/states' has step shape {d}, expected "
                                f"({state_dim or 'D'},) like the other demos")
            state_dim = d[0]
            lengths.append(n)
    long_demos = [i for i, n in enumerate(lengths) if n > MAX_DEMO_STEPS]
    if long_demos:  # spec §2.2: the original's 600-step windows would add mid-demo contexts
        warnings.warn(f"{path}: demos {long_demos} are longer than {MAX_DEMO_STEPS} steps; "
                      f"they still give one context each (their first state)", stacklevel=2)
    return {"n_demos": len(lengths), "lengths": lengths, "state_dim": state_dim,
            "language": lang, "long_demos": long_demos}


def select_demos(n_available: int, n: int) -> list[int]:
    """Few-shot subset of spec §2.2: floor(linspace(0, n_available - 1, n)), all if n is large.

    Integer arithmetic gives exactly the floor of the real-valued linspace (no float rounding
    of values like 48.9999); e.g. (50, 5) → [0, 12, 24, 36, 49], (50, 1) → [0].
    """
    if n_available < 1 or n < 1:
        raise ValueError(f"select_demos: need n_available >= 1 and n >= 1, got {n_available}, {n}")
    if n >= n_available:
        return list(range(n_available))
    if n == 1:
        return [0]
    return [k * (n_available - 1) // (n - 1) for k in range(n)]


def prepare(cfg: LiberoDataConfig, task: str, out: str | Path) -> dict:
    """Fetch and verify the official file of `task`, write the chosen demos to `out`."""
    t0 = time.perf_counter()
    tid, language, _ = task_languages(cfg.suite, task)  # an unknown task fails before any I/O
    src = fetch(cfg, task)
    info = verify(src, cfg.suite, task)
    chosen = select_demos(info["n_demos"], cfg.demos_per_task)
    total = 0
    with h5py.File(src, "r") as f, atomic_path(out) as tmp:
        keys = demo_keys(f)
        with h5py.File(tmp, "w", libver=("v110", "v110")) as o:
            data = o.create_group("data")
            obs_keys = sorted(f[f"data/{keys[chosen[0]]}/obs"])
            data.attrs.update({
                "env_name": "libero", "suite": cfg.suite, "task": task, "task_id": tid,
                "language": language, "format_version": FORMAT_VERSION, "image": True,
                "image_size": IMAGE_SIZE, "source_file": src.name,
                "source_demos_json": json.dumps(chosen), "obs_keys_json": json.dumps(obs_keys),
                "state_dim": info["state_dim"], "num_demos": len(chosen)})
            for j, i in enumerate(chosen):
                total += _copy_demo(f, keys[i], data.create_group(f"demo_{j}"), task, tid, i)
            data.attrs["total"] = total
    elapsed = time.perf_counter() - t0
    return {"n_demos": len(chosen), "total_steps": total, "seconds": elapsed,
            "source_demos": chosen, "source_file": src.name,
            "long_demos": [i for i in chosen if i in info["long_demos"]]}


def _copy_demo(f: h5py.File, key: str, dst: h5py.Group, task: str, tid: int, index: int) -> int:
    """Copy one demo group; reading every byte turns a truncated source into a DataError."""
    g = f[f"data/{key}"]
    name = None
    try:
        for name in COPIED:
            if name in g:
                f.copy(g[name], dst, name=name)
        name = "states"
        init_state = np.asarray(g["states"][0], dtype=np.float64)
    except (OSError, RuntimeError, KeyError) as e:
        raise DataError(f"{f.filename}: 'data/{key}/{name}' cannot be read, the file is "
                        f"truncated or corrupt ({e}); delete it and download it again") from None
    n = int(g.attrs["num_samples"])
    # init_state is the RIPT context (spec §5.2); variant = the source demo's index.
    dst.attrs.update({"num_samples": n, "init_state": init_state, "variant": index,
                      "task": task, "task_id": tid, "source_demo": key})
    return n


def main(argv=None) -> None:
    from ript.stage import add_common_args, load_block, setup_threads, stage_tracker

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--task", required=True, help="LIBERO task name of data.suite")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    a = p.parse_args(argv)
    setup_threads(a)
    cfg = from_dict(LiberoDataConfig, load_block(a.config), "data")
    from ript.envs.libero import task_index

    try:
        task_index(cfg.suite, a.task)
    except ValueError as e:
        p.error(str(e))  # one clear message listing the valid names, no traceback
    out = Path(a.out)
    with stage_tracker(a, "data", to_dict(cfg), task=a.task,
                       metrics=out.with_name(f".{out.stem}.metrics.jsonl")) as tr:
        stats = prepare(cfg, a.task, out)
        tr.log_metrics({k: stats[k] for k in ("n_demos", "total_steps", "seconds")}, step=0)
        tr.set_tags({"source_file": stats["source_file"],
                     "source_demos": json.dumps(stats["source_demos"])})
        tr.log_artifact(out)
    print(json.dumps({"task": a.task, **stats}))


if __name__ == "__main__":
    main()
