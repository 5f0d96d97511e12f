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


def as_json(block):
    """A config block as a compact JSON string for a stage CLI's --config (and a param)."""
    return json.dumps(block, sort_keys=True, separators=(",", ":"))


# Flags every stage CLI takes (ript/stage.py). Kept out of params: the pipeline id hashes the
# whole config and must not make every stage re-run when one block changes.
COMMON_ARGS = (
    f"--seed {SEED} --experiment-dir {RESULTS} --experiment {EXP} --pipeline-id {PIPELINE_ID}"
)


def all_outputs():
    return expand(f"{RESULTS}/data/{{task}}.hdf5", task=TASKS)
