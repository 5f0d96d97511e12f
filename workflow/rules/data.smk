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
    conda:
        "../envs/ript.yaml"
    shell:
        "python -m ript.tracking init --out {output} > {log} 2>&1"


rule demos:
    input:
        rules.mlflow_init.output,
    output:
        f"{RESULTS}/data/{{task}}.hdf5",
    log:
        f"{LOGS}/data/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{task}}.tsv"
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        seed=SEED,
        # only this task's settings: adding a task does not regenerate the others
        cfg=lambda w: as_json({**config["data"], "tasks": [w.task]}),
        code=source_hash("data", "envs/metaworld.py"),
    shell:
        "python -m ript.data.metaworld_demos --task {wildcards.task} --config {params.cfg:q} "
        "--out {output} --seed {params.seed} > {log} 2>&1"
