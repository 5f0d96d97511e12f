"""The experiment config as the pipeline runs it, resolved and checked before the first job.

`resolve(config)` builds every block through its stage's dataclass, which is the one source of
defaults (the JSON schema in `workflow/schemas/` checks structure and ranges only, and
`config/README.md` is tested against the dataclasses), then runs the checks that span blocks:
episode limits against the benchmark, observation keys against what the data stage records,
context kinds against the benchmark, the few-shot recipe's needs. The Snakefile calls it while
it builds the DAG, so `snakemake -n` already fails with one line naming the key (issue #12),
instead of a job failing hours later.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ript import settings as S
from ript.vla import settings as V
from ript.config import ConfigError, from_dict, require, to_dict
from ript.envs.benchmark import DEFAULT as DEFAULT_BENCHMARK
from ript.envs.benchmark import benchmark_class, get

TOP_LEVEL = {"experiment": None, "seed": 0, "variant": None}


def blocks() -> dict[str, type]:
    """Config block → the dataclass that holds its keys and defaults."""
    return {"language": S.LanguageConfig, "autoencoder": S.AutoencoderConfig,
            "prior": S.PriorConfig, "finetune": S.FinetuneConfig, "ript": S.RiptConfig,
            "evaluation": S.EvalConfig, "report": S.ReportConfig, "policy": V.PolicyConfig,
            "vla_sft": V.VlaSftConfig, "scale_head": V.ScaleHeadConfig}


def data_config_class(benchmark: str) -> type:
    """The data stage's config class of a benchmark."""
    try:
        return benchmark_class(benchmark).data_config()
    except ValueError as e:
        raise ConfigError(f"data.benchmark: {e}") from None


def resolve(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with every block complete (defaults from the dataclasses) and checked.

    Raises ConfigError with one line that names the offending key.
    """
    unknown = sorted(set(config) - set(TOP_LEVEL) - set(blocks()) - {"data", "pretrain"})
    require(not unknown, "config", f"unknown top-level key(s) {unknown}")
    require("experiment" in config, "experiment", "is required")
    out: dict[str, Any] = {k: config.get(k, v) for k, v in TOP_LEVEL.items()}

    data = dict(config.get("data") or {})
    benchmark = data.pop("benchmark", DEFAULT_BENCHMARK)
    cls = data_config_class(benchmark)
    if "benchmark" in {f.name for f in dataclasses.fields(cls)}:
        data["benchmark"] = benchmark
    out["data"] = {"benchmark": benchmark, **to_dict(from_dict(cls, data, "data"))}
    if config.get("pretrain") is not None:
        out["pretrain"] = to_dict(from_dict(S.PretrainConfig, config["pretrain"], "pretrain"))
    for name, block_cls in blocks().items():
        out[name] = to_dict(from_dict(block_cls, config.get(name), name))
    check(out)
    return out


def check(cfg: dict[str, Any]) -> None:
    """The checks that need more than one block (each names the key it refuses)."""
    data, name = cfg["data"], cfg["data"]["benchmark"]
    pretrain = cfg.get("pretrain")
    for block in ("data", "pretrain"):
        if not cfg.get(block):
            continue
        try:  # an unknown name fails listing the valid ones
            get(name, cfg[block].get("suite")).tasks(cfg[block]["tasks"])
        except ValueError as e:
            key = "suite" if "needs a suite" in str(e) else "tasks"
            raise ConfigError(f"{block}.{key}: {e}") from None
    bench = get(name, data.get("suite"))
    if pretrain:
        require(cfg["finetune"]["enabled"], "finetune.enabled",
                "`pretrain` trains stages 0-1 on other tasks; stage 2 (finetune.enabled: "
                "true) is what adapts the policy to data.tasks (spec §4.5)")
    for key in ("ript.max_episode_steps", "evaluation.max_episode_steps"):
        block, field = key.split(".")
        value = cfg[block][field]
        require(value <= bench.step_limit, key, f"{value} is more than {name}'s episode limit "
                                                f"of {bench.step_limit} steps")
    subset = cfg["ript"]["tasks"]
    if subset is not None:
        targets = bench.tasks(data["tasks"])
        require(bool(subset) and set(subset) <= set(targets), "ript.tasks",
                f"must be a non-empty subset of data.tasks; not among them: "
                f"{sorted(set(subset) - set(targets))}")
    family = cfg["policy"]["family"]
    if family != "quest":
        # A VLA acts where the env observes what it needs (vla_spec §2, §3); its stages 0-2 are
        # the released fine-tuning, so the QueST blocks below do not apply.
        require(bench.vla_observations, "policy.family",
                f"{family} needs a benchmark with VLA observations (renders of both cameras, "
                f"the 8-d proprio state); {name} has none")
        if cfg["policy"]["checkpoint"] == V.SCRATCH:
            require(bool(data.get("image", True)), "data.image",
                    "policy.checkpoint scratch trains on the demonstrations' images: set true")
            require(data.get("image_size") == cfg["vla_sft"]["image_size"], "vla_sft.image_size",
                    f"must equal data.image_size ({data.get('image_size')})")
        return
    recorded = bench.observation_keys(image=data.get("image", True))
    for key in ("lowdim_keys", "rgb_keys"):
        missing = [k for k in cfg["prior"][key] if k not in recorded]
        hint = (" (an image is recorded only with data.image: true)"
                if "image" in data and not data["image"] else "")
        require(not missing, f"prior.{key}", f"{missing} not recorded by the {name} data "
                                             f"stage; it records {recorded}{hint}")
    require(cfg["ript"]["contexts"] != "train_variants" or bench.variant_contexts,
            "ript.contexts", f"train_variants exists for benchmarks with task variants only; "
                             f"{name} contexts are the demos' initial states (demos)")
