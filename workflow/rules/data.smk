# Stage "data": MLflow store creation, then noisy scripted-expert demonstrations per task.


localrules:
    mlflow_init,


rule mlflow_init:
    # Create the store and experiment once: parallel jobs creating it at once race and fail.
    output:
        f"{RESULTS}/mlflow.json",
    log:
        f"{LOGS}/mlflow_init.log",
    benchmark:
        f"{RESULTS}/benchmarks/mlflow_init.tsv"
    shell:
        "{PYTHON} -m ript.tracking init --experiment-dir {RESULTS} --experiment {EXP} "
        "--out {output} > {log} 2>&1"


rule demos:
    input:
        rules.mlflow_init.output,
    output:
        f"{RESULTS}/data/{{task}}.hdf5",
    params:
        # only this task's settings: adding a task does not regenerate the others
        cfg=lambda w: as_json({**config["data"], "tasks": [w.task]}),
        code=source_hash("data", "envs/metaworld.py"),
    log:
        f"{LOGS}/data/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{task}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{PYTHON} -m ript.data.metaworld_demos --task {wildcards.task} --config {params.cfg:q} "
        "--out {output} {COMMON_ARGS} > {log} 2>&1"
