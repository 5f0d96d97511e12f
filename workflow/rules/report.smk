# The report: success before/after RIPT with intervals, RIPT curves, SFT losses, wall times.


# RIPT curves and stage losses exist only where those stages ran (a released OpenVLA checkpoint
# is evaluated as it is)
REPORT_FIGURES = {
    **(
        {
            "curves": report(
                f"{RESULTS}/report/ript_curves.png",
                caption="../report/ript_curves.rst",
                category="Report",
            )
        }
        if RIPT
        else {}
    ),
    **(
        {
            "losses": report(
                f"{RESULTS}/report/sft_losses.png",
                caption="../report/sft_losses.rst",
                category="Report",
            )
        }
        if stage_metrics()
        else {}
    ),
}


rule report:
    input:
        # the per-policy tables (ript.results) hold every success number the report shows
        sft_table=f"{RESULTS}/eval/sft/table.csv",
        ript_table=f"{RESULTS}/eval/ript/table.csv" if RIPT else [],
        ript_metrics=rules.ript.output.metrics if RIPT else [],
        stage_metrics=stage_metrics(),
    output:
        **REPORT_FIGURES,
        html=report(
            f"{RESULTS}/report/index.html",
            caption="../report/index.rst",
            category="Report",
        ),
        success=report(
            f"{RESULTS}/report/success.png",
            caption="../report/success.rst",
            category="Report",
        ),
        summary=f"{RESULTS}/report/summary.json",
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../envs/ript.yaml"
    params:
        cfg=as_json(config["report"]),
        code=source_hash("report.py", "results.py"),
        # the page shows the whole config; any change re-runs the (cheap) report
        full_config=as_json(config),
        benchmarks=f"{RESULTS}/benchmarks",
        ript=lambda w, input: (
            f"--ript-table {input.ript_table} --ript-metrics {input.ript_metrics}"
            if input.ript_table
            else ""
        ),
    shell:
        "python -m ript.report --config {params.cfg:q} --full-config {params.full_config:q} "
        "--sft-table {input.sft_table} {params.ript} "
        "--stage-metrics {input.stage_metrics} --benchmarks {params.benchmarks} "
        "--out-dir $(dirname {output.html}) > {log} 2>&1"
