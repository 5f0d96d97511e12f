"""Task names of a config, resolved and checked against the benchmark before any job runs.

Imported by the Snakefile at parse time, so a typo in a task name fails at once with the list of
valid names instead of inside a cluster job an hour later.
"""

from __future__ import annotations

# ML45 as QueST used it (`ML45_PRISE`, spec §2.5): these five are the few-shot test tasks and
# the other 45 MetaWorld tasks are the multitask training set.
ML45_TEST = ("box-close-v3", "disassemble-v3", "hand-insert-v3", "pick-place-wall-v3",
             "stick-pull-v3")


def resolve_tasks(benchmark: str, tasks: list[str] | str, suite: str | None = None) -> list[str]:
    """`tasks` as a checked list: names, or "all" (every task of a LIBERO suite, in benchmark
    order; for MetaWorld "all" is refused: name the tasks, e.g. ML45's 45)."""
    if benchmark == "metaworld":
        from ript.envs.metaworld import check_task

        if isinstance(tasks, str):
            raise ValueError("data.tasks: MetaWorld needs a list of task names, not "
                             f"{tasks!r} (see config/metaworld_ml45.yaml for ML45's)")
        return [check_task(t) for t in tasks]
    if benchmark == "libero":
        from ript.envs.libero import suite_tasks, task_index

        if suite is None:
            raise ValueError("LIBERO data needs a suite (data.suite / pretrain.suite)")
        if tasks == "all":
            return suite_tasks(suite)
        if isinstance(tasks, str):
            raise ValueError(f"tasks: {tasks!r} is neither 'all' nor a list of task names")
        for t in tasks:
            task_index(suite, t)  # raises, listing the suite's tasks
        return list(tasks)
    raise ValueError(f"unknown benchmark {benchmark!r}; valid: metaworld, libero")


# Longest episode each benchmark allows: MetaWorld v3 truncates at 500 steps; LIBERO runs
# until robosuite's horizon of 1000.
EPISODE_STEP_LIMIT = {"metaworld": 500, "libero": 1000}


def step_limit(benchmark: str) -> int:
    if benchmark not in EPISODE_STEP_LIMIT:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {sorted(EPISODE_STEP_LIMIT)}")
    return EPISODE_STEP_LIMIT[benchmark]


def observation_keys(benchmark: str, image: bool = True) -> list[str]:
    """Observation keys that both the data stage records and the benchmark's env runner
    produces, i.e. the keys a policy may be trained on and rolled out with."""
    if benchmark == "metaworld":
        from ript.envs.metaworld import ObsSpec

        return ObsSpec(image=image).keys()
    if benchmark == "libero":
        from ript.envs.libero import CAMERAS, LOWDIM

        return list(LOWDIM.values()) + list(CAMERAS.values())
    raise ValueError(f"unknown benchmark {benchmark!r}; valid: {sorted(EPISODE_STEP_LIMIT)}")


def has_variant_contexts(benchmark: str) -> bool:
    """Whether RIPT can draw contexts from task variants without demos (MetaWorld's 50)."""
    return benchmark == "metaworld"
