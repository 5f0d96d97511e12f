# A stage that fails on the compute node, for tests/test_slurm.py: run through the unchanged
# workflow/profiles/slurm, the failure must surface as a failed Snakemake run (after the
# profile's retries), with the stage's log shown.


rule all:
    default_target: True
    input:
        "broken/done.txt",


rule broken_stage:
    output:
        "broken/done.txt",
    log:
        "logs/broken_stage.log",
    resources:
        mem_mb=100,
        runtime=5,
    shell:
        "echo 'broken_stage: deliberate failure on' $(hostname) > {log}; exit 3"
