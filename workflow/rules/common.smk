# Helpers shared by the rules. No rules here.
import json
import sys

from ript.utils import source_hash, stable_hash

EXP = config["experiment"]
RESULTS = f"results/{EXP}"
LOGS = f"logs/{EXP}"
SEED = config["seed"]
# The interpreter running Snakemake (the project's venv), so jobs need no activated env.
PYTHON = sys.executable
# One tag shared by every MLflow run of this pipeline configuration (conventions: MLflow).
PIPELINE_ID = f"{EXP}-{stable_hash(config)}"
TASKS = config["data"]["tasks"]


wildcard_constraints:
    task=r"[a-z0-9-]+",
    policy=r"sft|ript",


def as_json(block):
    """A config block as a compact JSON string for a stage CLI's --config (and a param)."""
    return json.dumps(block, sort_keys=True, separators=(",", ":"))


# Flags every stage CLI takes (ript/stage.py). Kept out of params: the pipeline id hashes the
# whole config and must not make every stage re-run when one block changes.
COMMON_ARGS = (
    f"--seed {SEED} --experiment-dir {RESULTS} --experiment {EXP} --pipeline-id {PIPELINE_ID}"
)


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
    stages = ["autoencoder", "prior"] + (["finetune"] if config["finetune"]["enabled"] else [])
    return [f"{RESULTS}/{s}/metrics.jsonl" for s in stages]


def launcher(resources):
    """`python`, or `torchrun` over the job's GPUs when a RIPT job is given several."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    if gpus > 1:
        return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node {gpus}"
    return PYTHON


# The whole resolved config, for the report page (not a param: the report only shows it).
FULL_CONFIG = as_json(config)


def all_outputs():
    return [f"{RESULTS}/report/index.html"]
