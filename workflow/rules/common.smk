# Helpers shared by the rules. No rules here.
import json
import os
import sys

from ript.utils import source_hash, stable_hash

EXP = config["experiment"]
RESULTS = f"results/{EXP}"
LOGS = f"logs/{EXP}"
SEED = config["seed"]
TASKS = config["data"]["tasks"]

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


def as_json(block):
    """A config block as a compact JSON string for a stage CLI's --config (and a param)."""
    return json.dumps(block, sort_keys=True, separators=(",", ":"))


DATA_FILES = expand(f"{RESULTS}/data/{{task}}.hdf5", task=TASKS)
# Library modules whose edits invalidate the supervised stages (README: "What re-runs").
TRAIN_CODE = ("train", "data/dataset.py", "data/hdf5.py")


def sft_model():
    """The policy RIPT starts from: stage 2's if decoder fine-tuning is on, else stage 1's."""
    stage = "finetune" if config["finetune"]["enabled"] else "prior"
    return f"{RESULTS}/{stage}/model.pt"


def policy_model(policy):
    return {"sft": sft_model(), "ript": f"{RESULTS}/ript/model.pt"}[policy]


def stage_metrics():
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
