"""The two-stage pipeline of a strategy that declares a search stage (`Strategy.search_strategy`), as one resumable
command: `adakd abl` is the pipeline of strategy abl (specs/abl.md §7), and sweeps run it for such cells.

Stage 1 runs the search strategy with the strategy's `search_overrides()` (ABL: `abl-search` learns gamma on a
held-out half of the training set at a constant lr); stage 2 trains a fresh student with the strategy itself and the
args its `handoff(search_dir)` gives (ABL: `gamma_from`), once per seed, all reusing the one search.
Layout: <root>/pipeline.yaml (the resolved config), <root>/search, <root>/final_seed<k>, <root>/summary.json.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from adakd import strategies
from adakd.engine.config import ConfigError, RunConfig, StrategyConfig, from_dict, merge, to_dict
from adakd.engine.resumable import fit_or_resume
from adakd.engine.runs import RunDirError, write_text_atomic


def pipeline_strategy(config: RunConfig, strategy: str | None = None) -> str:
    """The strategy whose pipeline runs: `strategy` if given, else the config's, which must declare a search stage."""
    name = strategy or config.strategy.name
    if strategies.get(name).search_strategy is None:
        raise ConfigError(f"strategy {name} declares no search stage, so it has no two-stage pipeline; run it with "
                          "`adakd distill`")
    return name


def stage_configs(config: RunConfig, root: Path, seeds: list[int],
                  strategy: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, config values) of the search run and of each final run of `strategy`'s pipeline (default: the
    config's strategy)."""
    name = pipeline_strategy(config, strategy)
    final = strategies.get(name)
    values = to_dict(config)
    if values["task"] != "distill":
        raise ConfigError(f"the {name} pipeline distills a student: give teacher.name and teacher.weights")
    given = values["strategy"]["name"]
    if given not in (StrategyConfig().name, name, final.search_strategy):
        raise ConfigError(f"the {name} pipeline runs the strategies {final.search_strategy} then {name}; "
                          f"strategy={given} belongs to `adakd distill`")
    args = dict(values["strategy"].get("args") or {})
    if any(key in args for key in final.search_options):
        raise ConfigError(f"the {name} pipeline searches {final.searched} itself; to reuse a searched "
                          f"{final.searched} run `adakd distill strategy={name} "
                          f"strategy.args.{final.search_options[0]}=RUN_DIR`")
    search = merge(merge(values, {"strategy": {"name": final.search_strategy, "args": args}, "name": "search",
                                  "out_dir": str(root)}), final.search_overrides())
    stages = [("search", search)]
    for seed in seeds:
        final_args = {**args, **final.handoff(root / "search")}
        stages.append((f"final_seed{seed}", merge(values, {
            "strategy": {"name": name, "args": final_args}, "name": f"final_seed{seed}", "out_dir": str(root),
            "seed": seed})))
    return stages


def pipeline_root(config: RunConfig, strategy: str | None = None) -> Path:
    """The folder of a new pipeline: out_dir / name, or a name made from the strategy, pair, data, method and seed."""
    name = config.name or (f"{strategy or config.strategy.name}_{config.teacher.name}-{config.model.name}_"
                           f"{config.data.name}_{config.distill.method}_seed{config.seed}")
    return Path(config.out_dir) / name


def run_pipeline(config: RunConfig | None, seeds: int = 1, root: str | Path | None = None,
                 resume: bool = False, runtime: list[str] | None = None, strategy: str | None = None,
                 command: str | None = None) -> dict[str, Any]:
    """Run (or continue) the search then the final runs for `seeds` seeds; return every run's summary.

    `strategy` names the pipeline's strategy (default: the one pipeline.yaml recorded, else the config's);
    `command` is how a user continues it, for messages (e.g. "adakd abl"). `runtime` overrides (threads, device,
    log.progress) apply to every stage and are not saved in pipeline.yaml.
    """
    if root is None:
        if config is None:
            raise ValueError("run_pipeline needs a config or the root of a pipeline to resume")
        root = pipeline_root(config, strategy)
    root = Path(root)
    plan = root / "pipeline.yaml"
    if resume:
        if not plan.is_file():
            what = f"an `{command}` folder" if command else "a pipeline folder"
            raise RunDirError(f"{str(root)!r} is not {what} (no pipeline.yaml)")
        saved = yaml.safe_load(plan.read_text())
        config, seeds = from_dict(saved["config"]), int(saved["seeds"])
        strategy = saved.get("strategy") or strategy  # folders written before it was recorded: the caller's
    else:
        if root.exists() and any(root.iterdir()):
            how = f"`{command} --resume {root}`" if command else f"run_pipeline(None, root={str(root)!r}, resume=True)"
            raise RunDirError(f"run directory {str(root)!r} already exists. Continue it with {how}, or choose "
                              "another with name=NEW_NAME")
        if seeds < 1:
            raise ConfigError("--seeds must be >= 1")
    strategy = pipeline_strategy(config, strategy)
    seed_list = [config.seed + k for k in range(seeds)]
    stages = stage_configs(config, root, seed_list, strategy)

    def write_plan() -> None:
        # Written once the first stage has accepted the config and found its data: bad input leaves no folder.
        if not plan.is_file():
            write_text_atomic(plan, yaml.safe_dump({"seeds": seeds, "strategy": strategy, "config": to_dict(config)},
                                                   sort_keys=False))

    summaries = {folder: fit_or_resume(root / folder, values, runtime, on_start=write_plan)
                 for folder, values in stages}
    finals = [s for k, s in summaries.items() if k.startswith("final")]
    result = {"root": str(root), "strategy": strategy, "search": summaries["search"], "final": finals}
    write_text_atomic(root / "summary.json", json.dumps(result, indent=2) + "\n")
    return result


def format_pipeline(result: dict[str, Any], strategy: str | None = None) -> str:
    """What the search found (the strategy's `describe_search`) and the final runs' last/best top-1 (mean ± std)."""
    root = Path(result["root"])
    name = strategy or result.get("strategy")
    if name is None:
        raise ValueError("format_pipeline needs the pipeline's strategy (a result of run_pipeline names it)")
    final = strategies.get(name)
    lines = [final.describe_search(root / "search")]
    last = [s["last_acc1"] for s in result["final"]]
    best = [s["best_acc1"] for s in result["final"]]

    def stat(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    lines.append(f"final ({len(last)} seed(s)): top-1 last epoch {stat(last)}%, best epoch {stat(best)}%")
    return "\n".join(lines)
