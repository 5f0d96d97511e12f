# Stage "data": MLflow store creation, then one demonstration file per task: noisy scripted
# experts (MetaWorld, spec §2.5) or the verified official LIBERO files (spec §2.1-2.2); and the
# LIBERO task embeddings (spec §2.3).


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
        "python -m ript.mlflow_init init --out {output} > {log} 2>&1"


rule demos:
    input:
        rules.mlflow_init.output,
    output:
        f"{RESULTS}/{{split}}/{{task}}.hdf5",
    log:
        f"{LOGS}/{{split}}/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{split}}/{{task}}.tsv"
    wildcard_constraints:
        split="data|pretrain_data",
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        seed=SEED,
        # only this task's settings: adding a task does not regenerate the others
        cfg=lambda w: as_json(data_block(w.split, w.task)),
        module=BENCHMARK.data_module,
        code=source_hash(*BENCHMARK.data_code),
    shell:
        "python -m {params.module} --task {wildcards.task} --config {params.cfg:q} "
        "--out {output} --seed {params.seed} > {log} 2>&1"


rule task_embeddings:
    # Computed once per suite with an offline sentence encoder (or CLIP, with a network).
    input:
        rules.mlflow_init.output,
    output:
        f"{RESULTS}/embeddings/{{suite}}.npz",
    log:
        f"{LOGS}/embeddings/{{suite}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embeddings/{{suite}}.tsv"
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        encoder=config["language"]["encoder"],
        code=source_hash("data/language.py", "data/task_embeddings.py"),
    shell:
        "python -m ript.data.task_embeddings --suite {wildcards.suite} --encoder {params.encoder} "
        "--out {output} > {log} 2>&1"
