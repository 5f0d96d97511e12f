# QueST stage 1: observation encoders + SkillGPT prior on the frozen autoencoder (spec §4).


rule prior:
    input:
        data=SFT_FILES,
        embeddings=EMBEDDINGS,
        init=rules.autoencoder.output.model,
    output:
        model=f"{RESULTS}/prior/model.pt",
        metrics=f"{RESULTS}/prior/metrics.jsonl",
    log:
        f"{LOGS}/prior.log",
    benchmark:
        f"{RESULTS}/benchmarks/prior.tsv"
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        seed=SEED,
        cfg=as_json(config["prior"]),
        code=source_hash("models", *TRAIN_CODE),
    shell:
        "python -m ript.train.sft --stage 1 --data {input.data} --init {input.init} "
        "--task-embeddings {input.embeddings} --config {params.cfg:q} --out {output.model} "
        "--metrics {output.metrics} --threads {threads} --seed {params.seed} --code-hash {params.code} > {log} 2>&1"
