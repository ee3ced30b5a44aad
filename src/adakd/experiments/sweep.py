"""Sweeps: a grid of runs planned from presets, overrides and axes; validated whole, then run, skipped or resumed.

A grid (a shipped one, see `grid_names()`, or a YAML file) names presets and overrides for every cell, axes whose
product gives the cells, seeds, and how `adakd table` lays the results out. Layout of a sweep folder:

    sweep.yaml          the grid as given, the command-line overrides and teachers, and the planned cells
    plan/<cell>.yaml    each cell's resolved config: a re-run refuses a started cell whose config changed
    cells/<cell>/       an ordinary run folder (a pipeline folder for a strategy with a search stage)
    state/<cell>.json   running / done / failed, with the error line; logs/<cell>.log: the cell's output

Teachers a cell needs and nobody gave are trained by the sweep first (cells `teacher-<name>`); with
`baselines: [student]` each distinct student is also trained alone (the tables' S row).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from adakd.engine.config import (SHORTHANDS, ConfigError, DistillConfig, ModelConfig, RunConfig, StrategyConfig,
                                 from_dict, read_yaml, resolve, to_dict)
from adakd.engine.runs import write_text_atomic
from adakd.models.external import ModelSourceError
from adakd.registry import UnknownNameError, suggestions

GRID_KEYS = ("description", "presets", "overrides", "axes", "include", "exclude", "rules", "seeds", "baselines",
             "teachers", "teacher_per_seed", "teacher_overrides", "table", "paper", "gpus_per_cell", "slurm")


class SweepError(ConfigError):
    """A grid, a sweep folder or a sweep option cannot be used as given; the message names the fix."""


@dataclass
class Cell:
    """One run of a sweep: its folder name, role, grid coordinates, seed and resolved config."""

    name: str
    kind: str  # "train" (a model alone: teachers, baselines, CE cells), "distill", or "pipeline" (search + final)
    coords: dict[str, str]
    seed: int
    config: dict[str, Any]
    after: list[str] = field(default_factory=list)  # cells whose checkpoints this one reads
    role: str = "cell"  # "cell" (of the grid), "teacher" or "student" (added by the sweep)
    teacher_cell: str | None = None
    student_cell: str | None = None

    def record(self) -> dict[str, Any]:
        """What sweep.yaml keeps of the cell (the config is in plan/<name>.yaml)."""
        return {"name": self.name, "kind": self.kind, "role": self.role, "coords": self.coords, "seed": self.seed,
                "after": self.after, "teacher_cell": self.teacher_cell, "student_cell": self.student_cell}


# ------------------------------------------------------------------------------------------------ grids


def grid_names() -> list[str]:
    """Names of the grids shipped inside the package."""
    return sorted(p.name[:-5] for p in resources.files("adakd.grids").iterdir() if p.name.endswith(".yaml"))


def load_grid(spec: str | Path) -> tuple[str, dict[str, Any]]:
    """(label, raw mapping) of a shipped grid name or a YAML file; unknown top-level keys are refused."""
    text = str(spec)
    if text in grid_names():
        raw = yaml.safe_load(resources.files("adakd.grids").joinpath(f"{text}.yaml").read_text()) or {}
        label = text
    elif Path(text).is_file() or text.endswith((".yaml", ".yml")):
        raw, label = read_yaml(text), Path(text).stem
    else:
        close = suggestions(text, grid_names())
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SweepError(f"unknown grid {text!r}: neither a shipped grid nor a YAML file.{hint} `adakd sweeps` "
                         "lists the shipped grids")
    for key in raw:
        if key not in GRID_KEYS:
            close = suggestions(str(key), list(GRID_KEYS), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(GRID_KEYS)}"
            raise SweepError(f"grid {label}: unknown key {key!r}{hint}")
    if not isinstance(raw.get("axes", {}), dict):
        raise SweepError(f"grid {label}: axes must be a mapping of axis -> list of values (or label -> settings)")
    return label, raw


def _label(value: Any) -> str:
    """A value as it appears in cell names: YAML scalars as text, characters unsafe in folder names as '-'."""
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value).lower() if isinstance(value, bool) \
        else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


@dataclass
class _Setting:
    """What one axis value (or rule, or include) adds: presets and override texts."""

    presets: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


def _override_texts(mapping: Any, where: str) -> list[str]:
    """{'optim.lr': 0.1, 'method': 'at'} as ['optim.lr=0.1', 'method="at"'] (JSON is YAML: values keep types)."""
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise SweepError(f"{where}: expected a mapping of KEY: VALUE, got {mapping!r}")
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def _setting(mapping: Any, where: str) -> _Setting:
    """A mapping of override keys plus an optional `presets` list."""
    if not isinstance(mapping, dict):
        raise SweepError(f"{where}: expected a mapping of KEY: VALUE (and optional presets: [...]), got {mapping!r}")
    values = dict(mapping)
    presets = values.pop("presets", [])
    if isinstance(presets, str):
        presets = [presets]
    return _Setting(list(presets), _override_texts(values, where))


def _axes(grid: dict[str, Any], label: str) -> dict[str, dict[str, _Setting]]:
    """Each axis as label -> setting: lists set the axis key; `pair` applies preset pair-V; mappings as given."""
    axes: dict[str, dict[str, _Setting]] = {}
    for axis, values in (grid.get("axes") or {}).items():
        where = f"grid {label}: axes.{axis}"
        if isinstance(values, dict):
            axes[axis] = {_label(k): _setting(v or {}, f"{where}.{k}") for k, v in values.items()}
        elif isinstance(values, list) and values:
            axes[axis] = {_label(v): _axis_value(axis, v) for v in values}
        else:
            raise SweepError(f"{where}: expected a non-empty list of values or a mapping of label -> settings")
        if not axes[axis]:
            raise SweepError(f"{where}: has no values")
    return axes


def _axis_value(axis: str, value: Any) -> _Setting:
    """The setting of a plain axis value."""
    if axis == "pair":
        return _Setting(presets=[f"pair-{value}"])
    if axis == "preset":
        return _Setting(presets=[str(value)])
    return _Setting(overrides=[f"{axis}={json.dumps(value)}"])


def _matches(coords: dict[str, str], pattern: dict[str, Any]) -> bool:
    """True when every axis named in `pattern` has one of its values (a value or a list of values)."""
    for axis, wanted in pattern.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if coords.get(axis) not in [_label(v) for v in options]:
            return False
    return True


def _seeds(grid: dict[str, Any], label: str) -> list[int]:
    seeds = grid.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
        raise SweepError(f"grid {label}: seeds must be a count (seeds 0..n-1) or a list of seeds, got {seeds!r}")
    values = list(range(seeds)) if isinstance(seeds, int) else seeds
    if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values) or \
            len(set(values)) != len(values):
        raise SweepError(f"grid {label}: seeds must be >= 1 or a list of distinct non-negative integers, got {seeds!r}")
    return values


# ------------------------------------------------------------------------------------------------ planning


def _coordinate_cells(grid: dict[str, Any], label: str, axes: dict[str, dict[str, _Setting]]
                      ) -> list[tuple[dict[str, str], _Setting]]:
    """The product of the axes minus `exclude`, plus `include`, each with its include-only setting."""
    names = list(axes)
    product = [dict(zip(names, combo)) for combo in itertools.product(*(list(axes[a]) for a in names))]
    excludes = grid.get("exclude") or []
    for entry in excludes:
        if not isinstance(entry, dict) or not set(entry) <= set(names):
            raise SweepError(f"grid {label}: each exclude entry must be a mapping of axis -> value over the axes "
                             f"{', '.join(names)}, got {entry!r}")
    cells = [(c, _Setting()) for c in product if not any(_matches(c, e) for e in excludes)]
    for entry in grid.get("include") or []:
        if not isinstance(entry, dict):
            raise SweepError(f"grid {label}: each include entry must be a mapping of axis -> value, got {entry!r}")
        entry = dict(entry)
        extra = _setting(entry.pop("overrides", None) or {}, f"grid {label}: include overrides")
        missing = [a for a in names if a not in entry]
        unknown = [a for a in entry if a not in names]
        if missing or unknown:
            raise SweepError(f"grid {label}: include entry {entry!r} must give every axis ({', '.join(names)})"
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        options = [[_label(v) for v in (entry[a] if isinstance(entry[a], list) else [entry[a]])] for a in names]
        for combo in itertools.product(*options):
            coords = dict(zip(names, combo))
            for axis, value in coords.items():
                # A label of a mapping axis must exist; a plain axis accepts any value (it sets the axis key).
                if value not in axes[axis] and not _plain_axis(grid, axis):
                    raise SweepError(f"grid {label}: include {axis}={value} is not one of that axis' labels "
                                     f"({', '.join(axes[axis])})")
            cells.append((coords, extra))
    return cells


def _plain_axis(grid: dict[str, Any], axis: str) -> bool:
    return isinstance((grid.get("axes") or {}).get(axis), list)


def _cell_name(coords: dict[str, str], seed: int) -> str:
    return "_".join([f"{axis}-{value}" for axis, value in coords.items()] + [f"seed{seed}"])


def _short_hash(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _alone(values: dict[str, Any], spec: dict[str, Any], name: str, seed: int, out: Path) -> dict[str, Any]:
    """The config of a network trained alone with cross-entropy, on a cell's data and recipe."""
    alone = copy.deepcopy(values)
    alone.update(task="train", seed=seed, name=name, out_dir=str(out),
                 # A pretrained network starts from its published weights here too: the baseline a distilled
                 # pretrained student is compared with must start where it starts.
                 model={**spec, "weights": None}, teacher=to_dict(ModelConfig()),
                 distill=to_dict(DistillConfig()), strategy=to_dict(StrategyConfig()), components={})
    return alone


class _Registry:
    """Cells the sweep adds (teachers, student baselines), one per distinct config."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.cells: dict[str, Cell] = {}

    def add(self, prefix: str, role: str, values: dict[str, Any], seed: int) -> Cell:
        """The cell training `values` alone, created once per distinct config; a name taken by another config gets
        a hash of its config as suffix."""
        base = f"{prefix}_seed{seed}"
        config = _alone(values, values["model"], base, seed, self.out)
        identity = {k: v for k, v in config.items() if k != "name"}
        for name in (base, f"{prefix}-{_short_hash(identity)}_seed{seed}"):
            existing = self.cells.get(name)
            if existing is None:
                config = {**config, "name": name}
                from_dict(config)  # validated like every cell
                self.cells[name] = Cell(name, "train", {}, seed, config, role=role)
                return self.cells[name]
            if {k: v for k, v in existing.config.items() if k != "name"} == identity:
                return existing
        raise SweepError(f"two different {role} configs hash alike: {base}")  # pragma: no cover


def plan(grid: dict[str, Any], label: str, out: Path, overrides: list[str] | None = None,
         teachers: dict[str, str] | None = None, check_teachers: bool = True) -> list[Cell]:
    """Every cell of the grid in the order they must run, each config resolved and validated (nothing is run).

    `check_teachers=False` plans a grid whose required teachers are not given (to count its cells).
    """
    from adakd import strategies
    from adakd.engine.build import check_names

    overrides = list(overrides or [])
    axes = _axes(grid, label)
    for text in overrides:
        key = text.split("=", 1)[0]
        if key in axes and _plain_axis(grid, key):
            raise SweepError(f"{key} is an axis of grid {label} ({', '.join(axes[key])}); to run fewer values, copy "
                             f"the grid to a YAML file and edit axes.{key}")
    given = {**{k: v for k, v in (grid.get("teachers") or {}).items() if v not in ("required", "train")},
             **(teachers or {})}
    required = {k for k, v in (grid.get("teachers") or {}).items() if v == "required"} - set(teachers or {})
    if not check_teachers:
        given.update({name: "<required>" for name in required})
        required = set()
    presets = list(grid.get("presets") or ["cifar100"])
    common = _override_texts(grid.get("overrides"), f"grid {label}: overrides")
    rules = grid.get("rules") or []
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), dict):
            raise SweepError(f"grid {label}: each rule must be a mapping with match: {{axis: value}} and overrides "
                             f"and/or presets, got {rule!r}")
    baselines = list(grid.get("baselines") or [])
    if set(baselines) - {"student"}:
        raise SweepError(f"grid {label}: baselines may only list 'student', got {baselines!r}")
    per_seed_teacher = bool(grid.get("teacher_per_seed", False))
    seeds = _seeds(grid, label)
    teacher_extra = _override_texts(grid.get("teacher_overrides"), f"grid {label}: teacher_overrides")
    cells_dir = out / "cells"
    added = _Registry(cells_dir)
    cells: list[Cell] = []
    for coords, extra in _coordinate_cells(grid, label, axes):
        setting = _Setting([], [])
        for axis, value in coords.items():
            part = axes[axis].get(value) or _axis_value(axis, value)
            setting.presets += part.presets
            setting.overrides += part.overrides
        for rule in rules:
            if _matches(coords, rule["match"]):
                part = _setting(rule.get("overrides") or {}, f"grid {label}: rule {rule['match']}")
                setting.presets += list(rule.get("presets") or [])
                setting.overrides += part.overrides
        for seed in seeds:
            name = _cell_name(coords, seed)
            # The grid is one layer (like a --config file), the sweep's command line another on top of it, so
            # `epochs=` given to the sweep rescales milestones the grid wrote, as it would for `adakd train`.
            layers = _Layers([*presets, *setting.presets, *extra.presets],
                             ["task=distill", *common, *setting.overrides, *extra.overrides],
                             [*overrides, f"seed={seed}", f"out_dir={json.dumps(str(cells_dir))}",
                              f"name={json.dumps(name)}"])
            try:
                config = resolve(layers.presets, None, layers.grid, after=layers.command)
                check_names(config)
            except (ConfigError, UnknownNameError, ModelSourceError) as err:  # one line naming the cell
                raise SweepError(f"grid {label}, cell {name}: {err}") from None
            values = to_dict(config)
            kind = "distill" if config.task == "distill" else "train"
            strategy_cls = strategies.get(config.strategy.name)
            search_options = strategy_cls.search_options
            if kind == "distill" and strategy_cls.search_strategy and not any(
                    k in config.strategy.args for k in search_options):
                kind = "pipeline"
            cell = Cell(name, kind, coords, seed, values)
            _attach_teacher(cell, config, given, required, added, per_seed_teacher, layers, teacher_extra, label)
            if "student" in baselines and kind != "train":
                student = added.add(f"student-{config.model.name}", "student", values, seed)
                cell.student_cell = student.name
            cells.append(cell)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise SweepError(f"grid {label}: cells {', '.join(twice[:3])} appear twice (an include repeats a product "
                         "cell); remove it from include or add it to exclude")
    # Cells the others read from run first.
    return [*added.cells.values(), *cells]


@dataclass
class _Layers:
    """The layers a cell was resolved from (its teacher is resolved again from them): presets, the grid's
    overrides, and the sweep's command line with the cell's seed and folder."""

    presets: list[str]
    grid: list[str]
    command: list[str]


def _teacher_override(text: str) -> str:
    """A teacher_overrides entry as an override of the distill config: `model.*` there is the teacher."""
    key, _, value = text.partition("=")
    key = SHORTHANDS.get(key, key)
    return f"teacher.{key[len('model.'):]}={value}" if key.startswith("model.") else f"{key}={value}"


def _teacher_values(layers: _Layers, extra: list[str], label: str, cell: str) -> dict[str, Any]:
    """The config of the cell's teacher trained alone: the cell's layers resolved again with teacher_overrides on
    top of the grid's overrides (the sweep's command line still last), so a teacher's own `epochs` rescales the
    recipe's milestones as `adakd train` would (merged into the students' resolved config, it kept the students'
    milestones: issue 18)."""
    try:
        config = resolve(layers.presets, None, layers.grid,
                         after=[*(_teacher_override(t) for t in extra), *layers.command])
    except ConfigError as err:
        raise SweepError(f"grid {label}, teacher of cell {cell} (teacher_overrides): {err}") from None
    values = to_dict(config)
    return {**values, "model": dict(values["teacher"])}


def _needs_teacher_weights(config: Any) -> bool:
    """The cell's strategy's answer (Strategy.needs_teacher_weights) on its options; options it refuses are reported
    when the cell runs, so here they count as needing a teacher."""
    from adakd import strategies

    cls = strategies.get(config.strategy.name)
    try:
        options = cls.resolve_options(dict(config.strategy.args))
    except (TypeError, ValueError):
        return True
    return cls.needs_teacher_weights(options)


def _attach_teacher(cell: Cell, config: Any, given: dict[str, str], required: set[str], added: _Registry,
                    per_seed: bool, layers: _Layers, extra: list[str], label: str) -> None:
    """Point a distill cell at its teacher: given, found under ADAKD_TEACHERS or fetched (`adakd teachers fetch`),
    or a teacher cell trained first."""
    if config.task != "distill" or config.teacher.weights or not _needs_teacher_weights(config):
        return
    name = config.teacher.name
    if name in given:
        cell.config["teacher"]["weights"] = str(given[name])
        return
    from adakd.data import dataset_info
    from adakd.engine.build import teacher_candidate, teacher_fetch_hint

    num_classes = dataset_info(config.data.name).get("num_classes")
    if teacher_candidate(name, num_classes) is not None:
        return
    if name in required:
        raise SweepError(f"teacher {name} must be given, the sweep does not train it: add "
                         f"--teacher {name}=PATH (a checkpoint: .pth, .safetensors or a run folder)"
                         f"{teacher_fetch_hint(name, num_classes)}")
    teacher_values = _teacher_values(layers, extra, label, cell.name)
    teacher = added.add(f"teacher-{name}", "teacher", teacher_values, cell.seed if per_seed else 0)
    cell.after.append(teacher.name)
    cell.teacher_cell = teacher.name
    cell.config["teacher"]["weights"] = str(added.out / teacher.name / "last.pth")


# ------------------------------------------------------------------------------------------------ sweep folder


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: values}


# Settings that place a run on a machine or change what it reports, not what it learns: a sweep continues across
# them (threads and loader workers are chosen per machine; null means measured at start; whether and from where a
# missing dataset is downloaded changes no file a run reads, the checksums see to that).
PLACEMENT_KEYS = ("threads", "data.num_workers", "log.", "data.download", "data.mirror")


def _placement(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in PLACEMENT_KEYS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every dotted key that differs, except threads and log.* (they change no result).

    A key the old config lacks counts as its default: a plan written before a setting existed (e.g. `components`)
    continues when the new config leaves that setting at its default.
    """
    defaults = _flatten(to_dict(RunConfig()))
    a, b = {**defaults, **_flatten(old)}, {**defaults, **_flatten(new)}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _placement(k)]


class Sweep:
    """A sweep folder: its planned cells and the state of each on disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / "sweep.yaml"

    def cell_dir(self, name: str) -> Path:
        return self.root / "cells" / name

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def load(self) -> dict[str, Any]:
        """sweep.yaml, or one error saying the folder is not a sweep or how to rebuild a damaged sweep.yaml."""
        if not self.manifest.is_file():
            raise SweepError(f"{str(self.root)!r} is not a sweep folder (no sweep.yaml); give the --out folder of "
                             "an `adakd sweep`")
        try:
            manifest = yaml.safe_load(self.manifest.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise SweepError(self._damaged(f"is not valid YAML ({type(err).__name__})")) from None
        missing = [k for k in ("grid", "overrides", "teachers", "source", "cells")
                   if not isinstance(manifest, dict) or k not in manifest]
        if missing:
            raise SweepError(self._damaged(f"lacks {', '.join(missing)} (cut short?)"))
        return manifest

    def _damaged(self, what: str) -> str:
        return (f"{self.manifest} {what}: rebuild it by running `adakd sweep GRID --out {self.root}` with the grid, "
                "KEY=VALUE overrides and --teacher options it was started with (finished cells are kept)")

    def _plan_file(self, name: str) -> dict[str, Any]:
        path = self.root / "plan" / f"{name}.yaml"
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
            raise SweepError(self._damaged(f"names cell {name}, whose plan/{name}.yaml cannot be read "
                                           f"({type(err).__name__})")) from None
        if not isinstance(config, dict):
            raise SweepError(self._damaged(f"names cell {name}, whose plan/{name}.yaml is empty or cut short"))
        return config

    def cells(self) -> list[Cell]:
        """The planned cells with their configs."""
        manifest = self.load()
        try:
            return [Cell(config=self._plan_file(record["name"]), **record) for record in manifest["cells"]]
        except (TypeError, KeyError) as err:
            raise SweepError(self._damaged(f"has a malformed cell entry ({type(err).__name__}: {err})")) from None

    def check_unchanged(self, cells: Iterable[Cell]) -> list[str]:
        """Refuse any started cell whose resolved config differs from the one it was started with; return the
        failed cells whose config changed (a fix such as a corrected teacher path: the caller restarts them)."""
        restart = []
        for cell in cells:
            saved = self.root / "plan" / f"{cell.name}.yaml"
            if not saved.is_file() or not self.cell_dir(cell.name).exists() and self.state(cell)["state"] != "failed":
                continue
            changes = config_changes(yaml.safe_load(saved.read_text()), cell.config)
            if changes and self.state(cell)["state"] == "failed":
                restart.append(cell.name)
            elif changes:
                more = f" (and {len(changes) - 2} more)" if len(changes) > 2 else ""
                raise SweepError(f"cell {cell.name} was started with another config ({'; '.join(changes[:2])}{more}):"
                                 f" run the changed grid with another --out, or delete {self.cell_dir(cell.name)} "
                                 "to redo that cell")
        return restart

    def set_aside(self, name: str) -> Path:
        """Move a failed cell's folder and log to failed/<name>-<time>/ and forget its state: it starts afresh."""
        target = self.root / "failed" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.mkdir(parents=True, exist_ok=True)
        for path in (self.cell_dir(name), self.log_file(name)):
            if path.exists():
                os.replace(path, target / path.name)
        (self.root / "state" / f"{name}.json").unlink(missing_ok=True)
        return target

    def write_plan(self, grid_label: str, grid: dict[str, Any], overrides: list[str], teachers: dict[str, str],
                   cells: list[Cell]) -> None:
        """sweep.yaml and plan/<cell>.yaml (configs of cells not yet started are replaced)."""
        (self.root / "plan").mkdir(parents=True, exist_ok=True)
        for folder in ("cells", "logs", "state"):
            (self.root / folder).mkdir(exist_ok=True)
        for cell in cells:
            write_text_atomic(self.root / "plan" / f"{cell.name}.yaml", yaml.safe_dump(cell.config, sort_keys=False))
        import adakd

        manifest = {"grid": grid_label, "adakd_version": adakd.__version__, "overrides": overrides,
                    "teachers": teachers, "source": grid, "cells": [c.record() for c in cells]}
        write_text_atomic(self.manifest, yaml.safe_dump(manifest, sort_keys=False))

    def state(self, cell: Cell) -> dict[str, Any]:
        """{'state': done|failed|running|interrupted|pending, ...}: done from the results on disk, else the last
        state the cell wrote ('running' left by a killed process reads as interrupted)."""
        if (self.cell_dir(cell.name) / "summary.json").is_file():
            return {"state": "done"}
        path = self.root / "state" / f"{cell.name}.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("state") == "failed":
            return saved
        if self.cell_dir(cell.name).exists():
            return {**saved, "state": "interrupted"}
        return {"state": "pending"}

    def set_state(self, name: str, state: str, **extra: Any) -> None:
        """Record a cell's state (only rank 0 of a multi-process cell writes)."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        write_text_atomic(self.root / "state" / f"{name}.json",
                          json.dumps({"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}) + "\n")

    def result(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's summary (a pipeline cell's final run), or None while it is not done."""
        path = self.cell_dir(cell.name) / "summary.json"
        if not path.is_file():
            return None
        summary = json.loads(path.read_text())
        if cell.kind == "pipeline":
            return {**summary["final"][0], "search": summary["search"]}
        return summary


def run_cell(root: str | Path, name: str, runtime: list[str] | None = None) -> dict[str, Any]:
    """Train (or finish) one planned cell in this process; its state file says how it ended."""
    from adakd.experiments.pipeline import run_pipeline
    from adakd.engine.resumable import clear_unfinished, fit_or_resume

    sweep = Sweep(root)
    cells = {c.name: c for c in sweep.cells()}
    if name not in cells:
        raise SweepError(f"sweep {str(root)!r} has no cell {name!r}")
    cell = cells[name]
    folder = sweep.cell_dir(name)
    sweep.set_state(name, "running", pid=os.getpid(), host=os.uname().nodename)
    try:
        if cell.kind == "pipeline":
            resume = (folder / "pipeline.yaml").is_file()
            if folder.exists() and not resume:  # killed before its first stage was built
                for stage in folder.iterdir():
                    clear_unfinished(stage)
                folder.rmdir()
            values = {**cell.config, "out_dir": str(folder.parent), "name": folder.name}
            result = run_pipeline(None if resume else from_dict(values), seeds=1, root=folder, resume=resume,
                                  runtime=runtime)
            summary = result["final"][0]
        else:
            summary = fit_or_resume(folder, cell.config, runtime)
    except BaseException as err:
        from adakd.engine.resumable import UnreadableCheckpointError
        from adakd.engine.runs import one_line

        sweep.set_state(name, "failed", error=f"{type(err).__name__}: {one_line(err)}",
                        restart=isinstance(err, UnreadableCheckpointError))
        raise
    sweep.set_state(name, "done")
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m adakd.experiments.sweep ROOT CELL [KEY=VALUE ...]`: what a launcher runs for one cell."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m adakd.experiments.sweep SWEEP_DIR CELL [KEY=VALUE ...]", file=sys.stderr)
        return 2
    try:
        run_cell(args[0], args[1], args[2:])
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        from adakd.engine.runs import one_line

        print(f"adakd: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
