# QueST stage 0: the SkillVAE action autoencoder (spec §3). Resumes from ckpt/latest.pt.


rule autoencoder:
    input:
        data=DATA_FILES,
    output:
        model=f"{RESULTS}/autoencoder/model.pt",
        metrics=f"{RESULTS}/autoencoder/metrics.jsonl",
    params:
        cfg=as_json(config["autoencoder"]),
        code=source_hash("models/autoencoder.py", *TRAIN_CODE),
    log:
        f"{LOGS}/autoencoder.log",
    benchmark:
        f"{RESULTS}/benchmarks/autoencoder.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "{PYTHON} -m ript.train.sft --stage 0 --data {input.data} --config {params.cfg:q} "
        "--out {output.model} --metrics {output.metrics} --threads {threads} {COMMON_ARGS} > {log} 2>&1"
