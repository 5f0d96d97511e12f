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
from dataclasses import dataclass
from typing import Any, Literal

from ript.config import ConfigError, from_dict, require, to_dict


@dataclass
class PretrainConfig:
    """Block `pretrain`: the few-shot recipe's pretraining task set (spec §4.5)."""

    tasks: list[str] | str
    """Task names, or "all" (every task of a LIBERO suite)."""
    suite: str | None = None
    """LIBERO suite of these tasks (LIBERO only)."""
    demos_per_task: int = 50
    """Demonstrations per pretraining task."""


@dataclass
class LanguageConfig:
    """Block `language`: LIBERO task embeddings for the task token (spec §2.3)."""

    encoder: Literal["minilm", "clip"] = "minilm"
    """Offline all-MiniLM-L6-v2 (384-d) or the original's CLIP text tower (needs a network)."""


TOP_LEVEL = {"experiment": None, "seed": 0, "variant": None}
DEFAULT_BENCHMARK = "metaworld"  # `data.benchmark`


def blocks() -> dict[str, type]:
    """Config block → the dataclass that holds its keys and defaults (imported lazily: the
    stage modules pull in torch and the simulators)."""
    from ript.evaluate import EvalConfig
    from ript.report import ReportConfig
    from ript.rl.ript import RiptConfig
    from ript.train.sft import AutoencoderConfig, FinetuneConfig, PriorConfig

    return {"language": LanguageConfig, "autoencoder": AutoencoderConfig,
            "prior": PriorConfig, "finetune": FinetuneConfig, "ript": RiptConfig,
            "evaluation": EvalConfig, "report": ReportConfig}


def data_config_class(benchmark: str) -> type:
    """The data stage's config class of a benchmark."""
    if benchmark == "metaworld":
        from ript.data.metaworld_demos import DataConfig

        return DataConfig
    if benchmark == "libero":
        from ript.data.libero_data import LiberoDataConfig

        return LiberoDataConfig
    raise ConfigError(f"data.benchmark: unknown benchmark {benchmark!r}; "
                      "valid: metaworld, libero")


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
        out["pretrain"] = to_dict(from_dict(PretrainConfig, config["pretrain"], "pretrain"))
    for name, block_cls in blocks().items():
        out[name] = to_dict(from_dict(block_cls, config.get(name), name))
    check(out)
    return out


def check(cfg: dict[str, Any]) -> None:
    """The checks that need more than one block (each names the key it refuses)."""
    from ript.envs.tasks import has_variant_contexts, observation_keys, step_limit

    from ript.envs.tasks import resolve_tasks

    data, benchmark = cfg["data"], cfg["data"]["benchmark"]
    pretrain = cfg.get("pretrain")
    for block in ("data", "pretrain"):
        if cfg.get(block):
            try:  # an unknown name fails listing the valid ones
                resolve_tasks(benchmark, cfg[block]["tasks"], cfg[block].get("suite"))
            except ValueError as e:
                raise ConfigError(f"{block}.tasks: {e}") from None
    if pretrain:
        require(cfg["finetune"]["enabled"], "finetune.enabled",
                "`pretrain` trains stages 0-1 on other tasks; stage 2 (finetune.enabled: "
                "true) is what adapts the policy to data.tasks (spec §4.5)")
        require(benchmark != "libero" or pretrain.get("suite"), "pretrain.suite",
                "is required for LIBERO")
    limit = step_limit(benchmark)
    for key in ("ript.max_episode_steps", "evaluation.max_episode_steps"):
        block, name = key.split(".")
        value = cfg[block][name]
        require(value <= limit, key, f"{value} is more than {benchmark}'s episode limit of "
                                     f"{limit} steps")
    recorded = observation_keys(benchmark, image=data.get("image", True))
    for key in ("lowdim_keys", "rgb_keys"):
        missing = [k for k in cfg["prior"][key] if k not in recorded]
        hint = (" (MetaWorld records corner_rgb only with data.image: true)"
                if benchmark == "metaworld" and "corner_rgb" in missing else "")
        require(not missing, f"prior.{key}", f"{missing} not recorded by the {benchmark} data "
                                             f"stage; it records {recorded}{hint}")
    require(cfg["ript"]["contexts"] != "train_variants" or has_variant_contexts(benchmark),
            "ript.contexts", f"train_variants exists for MetaWorld only; {benchmark} contexts "
                             "are the demos' initial states (demos)")
