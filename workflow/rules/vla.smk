# An OpenVLA-family checkpoint (vla_spec §1.2, §3.6): check the local folder, fill it from the
# Hugging Face repo when it is incomplete and a download is allowed, else say which files to put
# where. Its manifest stands for the checkpoint in the DAG (stages 0-2 do not run).


rule vla_checkpoint:
    input:
        rules.mlflow_init.output,  # the MLflow store, created once before the stages log to it
    output:
        manifest=VLA_MANIFEST,
    log:
        f"{LOGS}/vla_checkpoint.log",
    benchmark:
        f"{RESULTS}/benchmarks/vla_checkpoint.tsv"
    conda:
        "../envs/ript.yaml"
    params:
        folder=config["policy"]["checkpoint"],
        repo=(
            f"--repo {config['policy']['hf_repo']}"
            if config["policy"]["hf_repo"]
            else ""
        ),
        revision=config["policy"]["hf_revision"],
        download="" if config["policy"]["download"] else "--no-download",
        code=source_hash("vla/fetch.py"),
        seed=SEED,
    shell:
        "python -m ript.vla.fetch --folder {params.folder:q} {params.repo} "
        "--revision {params.revision:q} {params.download} --out {output.manifest} "
        "--seed {params.seed} --code-hash {params.code} > {log} 2>&1"
