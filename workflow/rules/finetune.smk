# QueST stage 2 (optional): decoder fine-tuning with λ·L1 on decoded sampled tokens (spec §4.5).


rule finetune:
    input:
        data=DATA_FILES,
        init=rules.prior.output.model,
    output:
        model=f"{RESULTS}/finetune/model.pt",
        metrics=f"{RESULTS}/finetune/metrics.jsonl",
    log:
        f"{LOGS}/finetune.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune.tsv"
    conda:
        "../envs/ript.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        seed=SEED,
        cfg=as_json(config["finetune"]),
        code=source_hash("models", *TRAIN_CODE),
    shell:
        "python -m ript.train.sft --stage 2 --data {input.data} --init {input.init} "
        "--config {params.cfg:q} --out {output.model} --metrics {output.metrics} "
        "--threads {threads} --seed {params.seed} --code-hash {params.code} > {log} 2>&1"
