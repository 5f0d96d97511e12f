# An OpenVLA-family checkpoint (vla_spec §1.2, §3.6): check the local folder, fill it from the
# Hugging Face repo when it is incomplete and a download is allowed, else say which files to put
# where. Its manifest stands for the checkpoint in the DAG (stages 0-2 do not run). With
# policy.checkpoint "scratch", rule vla_sft writes that manifest instead.


rule vla_checkpoint:
    input:
        rules.mlflow_init.output,  # the MLflow store, created once before the stages log to it
    output:
        manifest=f"{RESULTS}/checkpoint/manifest.json",
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
        code=source_hash("vla/fetch.py", "vla/folder.py"),
        seed=SEED,
    shell:
        "python -m ript.vla.fetch --folder {params.folder:q} {params.repo} "
        "--revision {params.revision:q} {params.download} --out {output.manifest} "
        "--seed {params.seed} --code-hash {params.code} > {log} 2>&1"


# A CPU-sized OpenVLA-OFT trained here from scratch by OFT's L1 recipe (issue #15): the same
# architecture shrunk, written in the official folder layout, read by the same loader.
rule vla_sft:
    input:
        data=DATA_FILES,
    output:
        manifest=f"{RESULTS}/vla_sft/manifest.json",  # = VLA_MANIFEST when it runs
        metrics=f"{RESULTS}/vla_sft/metrics.jsonl",
    log:
        f"{LOGS}/vla_sft.log",
    benchmark:
        f"{RESULTS}/benchmarks/vla_sft.tsv"
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        seed=SEED,
        cfg=as_json(config["vla_sft"]),
        bench=f"--benchmark {DATA['benchmark']}"
        + (f" --suite {DATA['suite']}" if DATA.get("suite") else ""),
        crop="--center-crop" if config["policy"]["center_crop"] else "--no-center-crop",
        code=source_hash("vla", "train", "data/hdf5.py", "envs"),
    shell:
        "python -m ript.vla.sft --data {input.data} {params.bench} {params.crop} "
        "--config {params.cfg:q} --out {output.manifest} --metrics {output.metrics} "
        "--seed {params.seed} --code-hash {params.code} > {log} 2>&1"


# RIPT's Laplace scale head (vla_spec §4.1), fitted to the demonstrations with the policy frozen
# (the original never released this step); scale_head.source "released" skips it.
rule scale_head:
    input:
        data=DATA_FILES,
        checkpoint=VLA_MANIFEST,
    output:
        head=f"{RESULTS}/scale_head/scale_header.pth",
        metrics=f"{RESULTS}/scale_head/metrics.jsonl",
    log:
        f"{LOGS}/scale_head.log",
    benchmark:
        f"{RESULTS}/benchmarks/scale_head.tsv"
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        seed=SEED,
        cfg=as_json(config["scale_head"]),
        bench=f"--benchmark {DATA['benchmark']}"
        + (f" --suite {DATA['suite']}" if DATA.get("suite") else ""),
        crop="--center-crop" if config["policy"]["center_crop"] else "--no-center-crop",
        code=source_hash("vla", "train", "data/hdf5.py", "envs"),
    shell:
        "python -m ript.vla.scale_head --checkpoint {input.checkpoint} --data {input.data} "
        "{params.bench} {params.crop} --config {params.cfg:q} --out {output.head} "
        "--metrics {output.metrics} --seed {params.seed} --code-hash {params.code} > {log} 2>&1"
