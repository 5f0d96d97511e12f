# Helpers shared by the rules. No rules here.
import dataclasses
import json
import os
import sys

from ript.envs.benchmark import get as get_benchmark
from ript.utils import source_hash, stable_hash

# A preset's variant (e.g. `paper`, config/paper.yaml) gets its own results, never the preset's.
EXP = config["experiment"] + (f"-{config['variant']}" if config.get("variant") else "")
RESULTS = f"results/{EXP}"
LOGS = f"logs/{EXP}"
SEED = config["seed"]
DATA = config["data"]
# The benchmark of the target tasks (and of the pretraining ones, if any); the config was
# checked against it when the Snakefile resolved it (ript/experiment.py).
BENCHMARK = get_benchmark(DATA["benchmark"], DATA.get("suite"))
TASKS = BENCHMARK.tasks(DATA["tasks"])
PRETRAIN = config.get("pretrain")
PRETRAIN_TASKS = (
    get_benchmark(DATA["benchmark"], PRETRAIN.get("suite")).tasks(PRETRAIN["tasks"])
    if PRETRAIN
    else []
)
# Jobs find `python` of the environment that runs Snakemake (the project's .venv) first on
# PATH, so no activation step is needed, also inside SLURM jobs (they re-read this file).
_VENV_BIN = os.path.dirname(sys.executable)
os.environ.update(PATH=_VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
# Read by every stage CLI (ript/stage.py). Kept out of the params of rules on purpose, since the pipeline id
# hashes the whole config and must not make every stage re-run when one block changes.
os.environ.update(
    RIPT_EXPERIMENT=EXP,
    RIPT_EXPERIMENT_DIR=RESULTS,
    RIPT_PIPELINE_ID=f"{EXP}-{stable_hash(config)}",
)


def sim_threads(block):
    """Cores a simulator job (RIPT, evaluation) keeps busy: the runner steps in lockstep, its
    main process (the policy) and its env workers taking turns, so about `n_workers` of them
    (at least 1). Declaring 1 + n_workers left one of the default's 2 cores idle during RIPT
    (issue #16); on SLURM it is the job's --cpus-per-task."""
    return max(1, int(config[block]["n_workers"]))


def as_json(block):
    """A config block as a compact JSON string for a stage CLI's --config (and a param)."""
    return json.dumps(block, sort_keys=True, separators=(",", ":"))


DATA_FILES = expand(f"{RESULTS}/data/{{task}}.hdf5", task=TASKS)
PRETRAIN_FILES = expand(f"{RESULTS}/pretrain_data/{{task}}.hdf5", task=PRETRAIN_TASKS)
# Stages 0 and 1 learn from the pretraining tasks when there are some (spec §4.5).
SFT_FILES = PRETRAIN_FILES or DATA_FILES
# LIBERO's task token: one language-embedding file per suite, pretraining suite first (§2.3).
SUITES = (
    list(
        dict.fromkeys(
            [s for s in [(PRETRAIN or {}).get("suite"), DATA.get("suite")] if s]
        )
    )
    if BENCHMARK.language_embeddings
    else []
)
EMBEDDINGS = expand(f"{RESULTS}/embeddings/{{suite}}.npz", suite=SUITES)
# Library modules whose edits invalidate the supervised stages (README: "What re-runs").
TRAIN_CODE = ("train", "data/dataset.py", "data/hdf5.py")

# The data stage's own keys, read from its config class: a key the stage does not know is left
# out of its params, so editing one benchmark's keys cannot invalidate the other's files.
_DATA_KEYS = [f.name for f in dataclasses.fields(BENCHMARK.data_config())]


def data_block(split, task):
    """The data stage's config for one task of `data` (targets) or `pretrain_data`."""
    from shlex import quote

    block = {k: DATA[k] for k in _DATA_KEYS if k in DATA}
    src = PRETRAIN if split == "pretrain_data" else DATA
    block.update(tasks=[task], demos_per_task=src["demos_per_task"])
    if "suite" in src:
        block["suite"] = src["suite"]
    return block


# The policy family (config/README.md `policy`): an OpenVLA-family checkpoint replaces stages
# 0-2; the fetch stage's manifest stands for it in the DAG (workflow/rules/vla.smk).
FAMILY = config["policy"]["family"]
VLA = FAMILY != "quest"
# policy.checkpoint "scratch": a CPU-sized OFT trained here (rule vla_sft) instead of a download
SCRATCH = VLA and config["policy"]["checkpoint"] == "scratch"
# the manifest that stands for the checkpoint in the DAG (rule vla_checkpoint or vla_sft)
VLA_MANIFEST = f"{RESULTS}/{'vla_sft' if SCRATCH else 'checkpoint'}/manifest.json"
# RIPT runs for QueST and for OpenVLA-OFT (Laplace policy, ript/vla/rl.py) unless switched off;
# OpenVLA (discrete) is evaluated as released (ript/experiment.py says so for ript.enabled)
RIPT = config["ript"]["enabled"]
# OFT's RIPT needs a Laplace scale head: trained by rule scale_head, or the released file
SCALE_HEAD = (
    f"{RESULTS}/scale_head/scale_header.pth"
    if RIPT and FAMILY == "openvla_oft" and config["scale_head"]["source"] == "train"
    else None
)
# a released head is the user's file: say so before the first job, not when RIPT starts
_HEAD_FILE = config["scale_head"]["file"]
if RIPT and FAMILY == "openvla_oft" and not SCALE_HEAD and _HEAD_FILE:
    if not os.path.isfile(_HEAD_FILE):
        raise WorkflowError(
            f"config error: scale_head.file: {_HEAD_FILE} not found: put RIPT's released scale "
            "head there ({scale_trunk, log_b_head}; the suite's LIBERO_<SUITE>_scale_header.pth "
            "from https://huggingface.co/tanshh97/RIPT_VLA, folder openvla_oft/scale_header), "
            "or train one (scale_head.source: train)"
        )


def vla_args():
    """The evaluate CLI's `--vla` (the policy block and the suite it acts in), VLAs only."""
    if not VLA:
        return ""
    from shlex import quote

    return f"--vla {quote(as_json(vla_block()))}"


def vla_block():
    """The policy block and where it acts (benchmark, suite, held-out split)."""
    block = {
        **config["policy"],
        "benchmark": DATA["benchmark"],
        "suite": DATA.get("suite"),
    }
    if DATA.get("eval_variants"):
        block["eval_variants"] = DATA["eval_variants"]
    return block


def ript_vla_args():
    """The RIPT CLI's `--vla` and `--scale-head` (OpenVLA-OFT only)."""
    if not VLA:
        return ""
    from shlex import quote

    args = f"--vla {quote(as_json(vla_block()))}"
    head = SCALE_HEAD or config["scale_head"]["file"]
    return args + (f" --scale-head {quote(str(head))}" if head else "")


def sft_model():
    """The policy RIPT starts from: stage 2's if decoder fine-tuning is on, else stage 1's;
    for a VLA, the checkpoint (its fetch stage's manifest)."""
    if VLA:
        return VLA_MANIFEST
    stage = "finetune" if config["finetune"]["enabled"] else "prior"
    return f"{RESULTS}/{stage}/model.pt"


def policy_model(policy):
    return {"sft": sft_model(), "ript": f"{RESULTS}/ript/model.pt"}[policy]


def stage_metrics():
    # a released VLA checkpoint is the fine-tuning; a scratch one's training and a trained
    # scale head are stages here
    if VLA:
        return [f"{RESULTS}/vla_sft/metrics.jsonl"] * SCRATCH + (
            [f"{RESULTS}/scale_head/metrics.jsonl"] if SCALE_HEAD else []
        )
    stages = ["autoencoder", "prior"] + (
        ["finetune"] if config["finetune"]["enabled"] else []
    )
    return [f"{RESULTS}/{s}/metrics.jsonl" for s in stages]


def launcher(resources):
    """`python`, or `torchrun` over the job's GPUs when a RIPT job is given several."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    if gpus > 1:
        return f"python -m torch.distributed.run --standalone --nproc_per_node {gpus}"
    return "python"


def all_outputs():
    return [f"{RESULTS}/report/index.html"]
