# QueST stage 0: the SkillVAE action autoencoder (spec §3). Resumes from ckpt/latest.pt.


rule autoencoder:
    input:
        data=SFT_FILES,
    output:
        model=f"{RESULTS}/autoencoder/model.pt",
        metrics=f"{RESULTS}/autoencoder/metrics.jsonl",
    log:
        f"{LOGS}/autoencoder.log",
    benchmark:
        f"{RESULTS}/benchmarks/autoencoder.tsv"
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        seed=SEED,
        cfg=as_json(config["autoencoder"]),
        code=source_hash("models/autoencoder.py", *TRAIN_CODE),
    shell:
        "python -m ript.train.sft --stage 0 --data {input.data} --config {params.cfg:q} "
        "--out {output.model} --metrics {output.metrics} --threads {threads} --seed {params.seed} --code-hash {params.code} > {log} 2>&1"
