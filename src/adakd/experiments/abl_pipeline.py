"""`adakd abl`: ABL's two stages as one resumable command (specs/abl.md §7).

Stage 1 (`abl-search`) learns gamma on a held-out half of the training set at a constant lr; stage 2 (`abl`)
retrains a fresh student on the full training set with p = softmax(gamma*) fixed, once per seed, all reusing
the one gamma*. Layout: <root>/pipeline.yaml (the resolved config), <root>/search, <root>/final_seed<k>.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from adakd.engine.config import ConfigError, RunConfig, from_dict, merge, to_dict
from adakd.engine.resumable import fit_or_resume
from adakd.engine.runs import RunDirError, write_text_atomic

def stage_configs(config: RunConfig, root: Path, seeds: list[int]) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, config values) of the search run and of each final run."""
    values = to_dict(config)
    if values["task"] != "distill":
        raise ConfigError("adakd abl distills a student: give teacher.name and teacher.weights")
    if values["strategy"]["name"] not in ("standard", "abl", "abl-search"):
        raise ConfigError(f"adakd abl runs the strategies abl-search then abl; strategy={values['strategy']['name']}"
                          " belongs to `adakd distill`")
    args = dict(values["strategy"].get("args") or {})
    if "gamma_from" in args or "gamma" in args or "p1" in args:
        raise ConfigError("adakd abl searches gamma itself; to reuse a searched gamma run `adakd distill "
                          "strategy=abl strategy.args.gamma_from=RUN_DIR`")
    search = merge(values, {"strategy": {"name": "abl-search", "args": args}, "name": "search",
                            "out_dir": str(root),
                            # §12 row 12: stage 1 runs at the constant base lr (its length comes from the steps).
                            "optim": {"milestones": []}})
    stages = [("search", search)]
    for seed in seeds:
        final_args = {**args, "gamma_from": str(root / "search")}
        stages.append((f"final_seed{seed}", merge(values, {
            "strategy": {"name": "abl", "args": final_args}, "name": f"final_seed{seed}", "out_dir": str(root),
            "seed": seed})))
    return stages


def pipeline_root(config: RunConfig) -> Path:
    """The folder of a new pipeline: out_dir / name, or a name made from the pair, data, method and seed."""
    name = config.name or (f"abl_{config.teacher.name}-{config.model.name}_{config.data.name}_"
                           f"{config.distill.method}_seed{config.seed}")
    return Path(config.out_dir) / name


def run_pipeline(config: RunConfig | None, seeds: int = 1, root: str | Path | None = None,
                 resume: bool = False, runtime: list[str] | None = None) -> dict[str, Any]:
    """Run (or continue) stage 1 then stage 2 for `seeds` seeds; return every run's summary.

    `runtime` overrides (threads, device, log.progress) apply to every stage and are not saved in pipeline.yaml.
    """

    if root is None:
        if config is None:
            raise ValueError("run_pipeline needs a config or the root of a pipeline to resume")
        root = pipeline_root(config)
    root = Path(root)
    plan = root / "pipeline.yaml"
    if resume:
        if not plan.is_file():
            raise RunDirError(f"{str(root)!r} is not an `adakd abl` folder (no pipeline.yaml)")
        saved = yaml.safe_load(plan.read_text())
        config, seeds = from_dict(saved["config"]), int(saved["seeds"])
    else:
        if root.exists() and any(root.iterdir()):
            raise RunDirError(f"run directory {str(root)!r} already exists. Continue it with `adakd abl --resume "
                              f"{root}`, or choose another with name=NEW_NAME")
        if seeds < 1:
            raise ConfigError("--seeds must be >= 1")
    seed_list = [config.seed + k for k in range(seeds)]
    stages = stage_configs(config, root, seed_list)

    def write_plan() -> None:
        # Written once the first stage has accepted the config and found its data: bad input leaves no folder.
        if not plan.is_file():
            write_text_atomic(plan, yaml.safe_dump({"seeds": seeds, "config": to_dict(config)}, sort_keys=False))

    summaries = {folder: fit_or_resume(root / folder, values, runtime, on_start=write_plan)
                 for folder, values in stages}
    finals = [s for k, s in summaries.items() if k.startswith("final")]
    result = {"root": str(root), "search": summaries["search"], "final": finals}
    write_text_atomic(root / "summary.json", json.dumps(result, indent=2) + "\n")
    return result


def format_pipeline(result: dict[str, Any]) -> str:
    """The searched p1 and the final runs' last/best top-1 (mean ± std over seeds)."""
    import statistics

    root = Path(result["root"])
    gamma = json.loads((root / "search" / "gamma.json").read_text())
    p1 = " ".join(f"{v:.3f}" for v in gamma["p1"])
    ran = gamma.get("search") or {}  # older gamma.json files have no record of the search's size
    done = f"{gamma['meta_steps']}" + (f" of up to {ran['meta_steps']}" if "meta_steps" in ran else "")
    size = (f" at meta_lr {ran['meta_lr']:.3g}, search_scale {ran['search_scale']} (S = {ran['scale']:.3g})"
            if {"meta_lr", "search_scale", "scale"} <= set(ran) else "")
    settled = ", stopped early: p1 settled" if gamma.get("stopped_early") else ""
    lines = [f"search: {root / 'search'} ({done} gamma updates{size}{settled}); student weight p1 per block: {p1}"]
    last = [s["last_acc1"] for s in result["final"]]
    best = [s["best_acc1"] for s in result["final"]]

    def stat(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    lines.append(f"final ({len(last)} seed(s)): top-1 last epoch {stat(last)}%, best epoch {stat(best)}%")
    return "\n".join(lines)
