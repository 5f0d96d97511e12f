"""config/README.md cannot drift from the defaults: every key of every block's dataclass (the one
source of defaults, ript/experiment.py) has a row there, and every default written there is the
dataclass's (issue #12: defaults in three places had begun to disagree)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from conftest import REPO
from ript.data.libero_data import LiberoDataConfig
from ript.data.metaworld_demos import DataConfig
from ript.experiment import DEFAULT_BENCHMARK, TOP_LEVEL, blocks
from ript.settings import PretrainConfig
from ript.train.loop import OptimConfig

# Rows whose default is prose, not a value (checked by hand when written).
DESCRIBED: dict[tuple[str, str], str] = {}
REQUIRED = "—"  # a key without a default


def _tables() -> dict[tuple[str, str], str]:
    """(section, key) → default cell. A section is the backticked name of a `## ` heading; the
    data section's tables after 'MetaWorld only:' / 'LIBERO only:' get their own section."""
    rows, section = {}, None
    for line in (REPO / "config" / "README.md").read_text().splitlines():
        if line.startswith("## "):
            m = re.match(r"## `(\w+)`", line)
            section = m.group(1) if m else ("top" if "Top level" in line else None)
        elif line.strip() in ("MetaWorld only:", "LIBERO only:") and section.startswith("data"):
            section = "data_" + line.split()[0].lower()
        elif section and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            keys = re.findall(r"`([\w.*]+)`", cells[0])
            defaults = [cells[2]] if len(keys) == 1 else [d.strip() for d in cells[2].split(",")]
            assert len(defaults) == len(keys), f"README row {line!r}: keys and defaults differ"
            for k, d in zip(keys, defaults):
                rows[(section, k)] = d
    return rows


def _value(cell: str):
    v = yaml.safe_load(cell)
    if isinstance(v, str):
        try:  # YAML 1.1 reads 1e-4 as a string
            return float(v)
        except ValueError:
            return v
    return v


def _default(field: dataclasses.Field):
    if field.default == "":  # a required string the stage's validate() insists on
        return REQUIRED
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return REQUIRED


def _documented() -> dict[str, type]:
    return {**blocks(), "data": DataConfig,
            "data_metaworld": DataConfig, "data_libero": LiberoDataConfig,
            "pretrain": PretrainConfig, "train": OptimConfig}


def test_every_key_has_a_row_with_the_dataclass_default():
    rows = _tables()
    sections = _documented()
    checked = 0
    for (section, key), cell in rows.items():
        if key.endswith("*") or (section, key) in DESCRIBED and cell == DESCRIBED[section, key]:
            continue
        if (section, key) == ("data", "benchmark"):
            expected = DEFAULT_BENCHMARK
        elif section == "top":
            expected = TOP_LEVEL[key] if TOP_LEVEL[key] is not None or key == "variant" \
                else REQUIRED
        else:
            assert section in sections, f"config/README.md documents an unknown block {section}"
            fields = {f.name: f for f in dataclasses.fields(sections[section])}
            assert key in fields, f"config/README.md: {section}.{key} is not a config key"
            expected = _default(fields[key])
        got = cell if cell == REQUIRED else _value(cell)
        if section.startswith("data") and key == "tasks":
            continue  # "all" for LIBERO, required for MetaWorld: described in the row
        assert got == expected, f"config/README.md: {section}.{key} default {cell!r}, " \
                                f"the code's is {expected!r}"
        checked += 1
    assert checked > 60
    # and every key of every block is documented
    documented = {(s.split("_")[0] if s.startswith("data") else s, k) for s, k in rows}
    for name, cls in sections.items():
        block = name.split("_")[0] if name.startswith("data") else name
        for f in dataclasses.fields(cls):
            name = "train.*" if f.name == "train" else f.name  # its own table
            assert (block, name) in documented, f"config/README.md has no row for {block}.{name}"


@pytest.mark.parametrize("cell,value", [("1e-4", 1e-4), ("[robot_states]", ["robot_states"]),
                                        ("null", None), ('"RIPT on QueST"', "RIPT on QueST")])
def test_cells_parse(cell, value):
    assert _value(cell) == value
