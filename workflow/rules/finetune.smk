# QueST stage 2 (optional): decoder fine-tuning with λ·L1 on decoded sampled tokens (spec §4.5).


rule finetune:
    input:
        data=DATA_FILES,
        init=rules.prior.output.model,
    output:
        model=f"{RESULTS}/finetune/model.pt",
        metrics=f"{RESULTS}/finetune/metrics.jsonl",
    params:
        cfg=as_json(config["finetune"]),
        code=source_hash("models", *TRAIN_CODE),
    log:
        f"{LOGS}/finetune.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "{PYTHON} -m ript.train.sft --stage 2 --data {input.data} --init {input.init} "
        "--config {params.cfg:q} --out {output.model} --metrics {output.metrics} "
        "--threads {threads} {COMMON_ARGS} > {log} 2>&1"
