"""Figures of a run directory: loss terms and accuracy per epoch, SAKD's per-spot shares (the paper's Fig. 3), and
ABL's student weights during the search ([A] Fig. 3) and per-block head accuracy ([A] Fig. 4c / Fig. 6)."""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import yaml

# Logged under train/ but not loss terms: they get their own figures (or none) instead of the loss plot.
_NOT_LOSSES = ("/share/", "/policy_p/", "train/gumbel", "train/abl/p1/", "train/abl/p2/", "train/abl/hypergrad/",
               "train/abl/grad_norm/")


# A series with fewer points gets markers: a 1-epoch curve is a single point, which a bare line does not draw.
MARKERS_BELOW = 20
# Shares are fractions; autoscaling would stretch e.g. 0.985-1.0 over the whole axis and exaggerate small changes.
SHARE_YLIM = (0.0, 1.02)


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed."""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or PlottingUnavailable saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlottingUnavailable("plotting needs matplotlib: pip install matplotlib (or pip install '.[plot]' in "
                                  "an adakd checkout)") from None
    return plt


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """metrics.csv of a run as rows of floats (empty cells dropped)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: give the folder of a run (it holds metrics.csv)")
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def read_abl_gamma(run_dir: str | Path) -> list[dict[str, float | str]] | None:
    """abl_gamma.csv of an ABL search run (`phase` stays text, the rest floats), or None if the run has none."""
    path = Path(run_dir) / "abl_gamma.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        return [{k: v if k == "phase" else float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(handle)]


def _block_columns(columns: Sequence[str], prefix: str) -> list[str]:
    """Columns `<prefix>block<n>` in block order (block10 after block9)."""
    found = [(int(m.group(1)), c) for c in columns if c.startswith(prefix) and (m := re.search(r"block(\d+)$", c))]
    return [c for _, c in sorted(found)]


def _block_accuracy(rows: list[dict[str, float]]) -> tuple[list[int], list[float]] | None:
    """Block indices 1..L and the test accuracy of each head on the last epoch (block L: the student's own FC)."""
    last = rows[-1] if rows else {}
    columns = _block_columns(list(last), "test/block_acc/")
    if not columns or "test/acc1" not in last:
        return None
    blocks = [int(re.search(r"block(\d+)$", c).group(1)) for c in columns]
    return [*blocks, blocks[-1] + 1], [last[c] for c in columns] + [last["test/acc1"]]


def run_name(run_dir: str | Path) -> str:
    """The run's name for figure titles: its folder name, after its pipeline's for an `adakd abl` stage."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}" if (path.parent / "pipeline.yaml").is_file() else path.name


def configured_warm_steps(run_dir: str | Path) -> int | None:
    """The run's ABL warm start in steps (strategy.args.warm_steps, else its options' default); None if unknown."""
    from adakd import strategies
    from adakd.registry import UnknownNameError

    try:  # what the search recorded it ran with (search_scale=auto sizes it from the data, unknown to the config)
        ran = json.loads((Path(run_dir) / "gamma.json").read_text()).get("search", {}).get("warm_steps")
        if isinstance(ran, int) and not isinstance(ran, bool):
            return ran
    except (OSError, ValueError, AttributeError):
        pass
    path = Path(run_dir) / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None  # the figure falls back to the first meta row
    strategy = values.get("strategy") if isinstance(values, dict) else None
    if not isinstance(strategy, dict) or not isinstance(strategy.get("name"), str):
        return None
    try:
        cls = strategies.get(strategy["name"])
    except UnknownNameError:
        return None
    option_class = cls.option_class
    if option_class is None or not dataclasses.is_dataclass(option_class):
        return None
    fields = {f.name for f in dataclasses.fields(option_class)}
    if "warm_steps" not in fields:
        return None
    # Precedence of the strategy itself: the user's args over the class preset over the options' default; the
    # options class applies its own rules (search_scale), so the figure shows the warm start the run used.
    merged = {**cls.preset, **(strategy.get("args") or {})}
    try:
        options = option_class(**{k: v for k, v in merged.items() if k in fields})
    except (TypeError, ValueError):
        return None
    value = options.warm_steps
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def pipeline_stages(root: str | Path) -> list[Path]:
    """Stage folders of an `adakd abl` folder that hold metrics.csv: search first, then the final runs by seed."""
    def order(path: Path) -> tuple[int, int, str]:
        seed = re.fullmatch(r"final_seed(\d+)", path.name)
        return (0 if path.name == "search" else 1, int(seed.group(1)) if seed else 0, path.name)

    return sorted((p for p in Path(root).iterdir() if (p / "metrics.csv").is_file()), key=order)


def plot_pipeline(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Plot every stage of an `adakd abl` folder into <stage>/plots (or `out`/<stage>); return every path."""
    stages = [stage for stage in pipeline_stages(root) if read_metrics(stage)]
    if not stages:
        raise ValueError(f"{str(root)!r} is an `adakd abl` folder, but none of its stages has finished an epoch "
                         "(no metrics rows yet): plot it once the search has logged an epoch")
    paths: list[Path] = []
    for stage in stages:
        paths += plot_run(stage, Path(out) / stage.name if out else None)
    return paths


def _labels(paths: Sequence[Path]) -> list[str]:
    """Run folder names, or the paths as given when two runs share a folder name."""
    names = [p.resolve().name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def plot_run(run_dir: str | Path, out: str | Path | None = None, compare: Sequence[str | Path] = ()) -> list[Path]:
    """Write PNG figures next to the metrics (or into `out`) and return their paths.

    `compare` names other run folders whose per-block accuracy is drawn beside this run's in block_accuracy.png.
    An `adakd abl` folder (pipeline.yaml, no metrics.csv) plots each of its stages (see `plot_pipeline`).
    """
    plt = pyplot()
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    folder_given = Path(run_dir)
    if not (folder_given / "metrics.csv").is_file():
        if (folder_given / "pipeline.yaml").is_file():
            if compare:
                raise ValueError(f"--compare takes one run, but {str(run_dir)!r} is an `adakd abl` folder: give "
                                 f"one of its stages, e.g. {str(folder_given / 'final_seed0')!r}")
            return plot_pipeline(run_dir, out)
        what = "is neither" if folder_given.exists() else "does not exist, so it is neither"
        raise FileNotFoundError(f"{str(run_dir)!r} {what} a run folder (it would hold metrics.csv) nor an "
                                "`adakd abl` folder (pipeline.yaml): give the folder of a run or of an `adakd abl` "
                                "pipeline")
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.csv has no epochs yet")
    # Read every comparison run first, so a wrong path fails before any figure is written.
    compared = [(Path(path), read_metrics(path)) for path in compare]
    for path, other in compared:
        if _block_accuracy(other) is None:
            raise ValueError(f"{str(path)!r} has no test/block_acc columns in its last metrics row: "
                             "--compare takes ABL runs only")
    if compared and _block_accuracy(rows) is None:
        raise ValueError(f"--compare draws block_accuracy.png, but {str(run_dir)!r} has no test/block_acc columns")
    folder = Path(out) if out else Path(run_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in rows]
    columns = list(dict.fromkeys(c for r in rows for c in r))
    name = run_name(run_dir)

    def marker(points: int) -> dict[str, object]:
        return {"marker": "o", "markersize": 4} if points < MARKERS_BELOW else {}

    def title(ax, what: str) -> None:
        # A 6.4-inch figure holds about 70 characters of title: a longer one puts the run name on its own line.
        ax.set_title(f"{name}: {what}" if len(name) + len(what) <= 68 else f"{name}:\n{what}")

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def figure(file: str, keys: list[str], ylabel: str, what: str, short_labels: bool = True,
               ylim: tuple[float, float] | None = None) -> Path | None:
        keys = [k for k in keys if any(k in r for r in rows)]
        if not keys:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for key in keys:
            label = key.split("/", 1)[-1] if short_labels else key
            ax.plot(epochs, [r.get(key, float("nan")) for r in rows], label=label,
                    **marker(sum(key in r for r in rows)))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        title(ax, what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=1 + len(keys) // 12)
        return save(fig, file)

    def gamma_trajectories() -> Path | None:
        gamma = read_abl_gamma(run_dir)
        keys = _block_columns(list(gamma[0]), "p1/") if gamma else []
        if not keys:
            return None
        steps = [r["step"] for r in gamma]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        colors = matplotlib.colormaps["viridis"].resampled(len(keys))
        for index, key in enumerate(keys):
            ax.plot(steps, [r.get(key, float("nan")) for r in gamma], color=colors(index), label=key.split("/")[-1],
                    **marker(sum(key in r for r in gamma)))
        # Warm start: gamma is frozen at 0 (p1 = 0.5) until step warm_steps. Meta rows are logged only every
        # log_every gamma updates, so the first one is a late estimate, used only when the config does not say.
        warm_end = configured_warm_steps(run_dir)
        if warm_end is None:
            meta_steps = [r["step"] for r in gamma if r.get("phase") == "meta"]
            warm_end = min(meta_steps) if meta_steps and len(meta_steps) < len(gamma) else None
        warm = []
        if warm_end is not None and warm_end > steps[0]:
            warm = [ax.axvspan(steps[0], warm_end, color="grey", alpha=0.15, label="warm start")]
            ax.axvline(warm_end, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel("student weight p1 (p2 = 1 - p1)")
        title(ax, "ABL student weight per block (ABL Fig. 3)")
        ax.grid(alpha=0.3)
        if len(keys) <= 12:
            ax.legend(fontsize="small", ncol=1 + len(keys) // 7)
        else:
            scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.5, len(keys) + 0.5), colors)
            fig.colorbar(scale, ax=ax, label="block")
            if warm:
                ax.legend(handles=warm, fontsize="small")
        return save(fig, "gamma_trajectories")

    def block_accuracy() -> Path | None:
        runs = [(Path(run_dir), rows), *compared]
        curves = [(label, _block_accuracy(r)) for label, (_, r) in zip(_labels([p for p, _ in runs]), runs)]
        if curves[0][1] is None:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, (blocks, accuracy) in curves:
            ax.plot(blocks, accuracy, marker="o", label=label)
        ax.set_xlabel("block (last = the student's own classifier)")
        ax.set_ylabel("test top-1 of the block's head (%)")
        title(ax, "per-block test accuracy (ABL Fig. 4c / Fig. 6)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return save(fig, "block_accuracy")

    skip = {"train/loss", "train/acc1", "train/images_per_s"}
    terms = [c for c in columns if c.startswith("train/") and c not in skip and not any(s in c for s in _NOT_LOSSES)]
    made = [
        figure("accuracy", ["train/acc1", "test/acc1", "test/acc5"],
               "top-1 / top-5 (%)" if "test/acc5" in columns else "top-1 (%)", "accuracy", short_labels=False),
        figure("losses", ["train/loss", *terms], "loss (weighted term)", "training loss terms"),
        figure("spot_shares", [c for c in columns if "/share/" in c], "share of samples distilled",
               "distilled share per spot (SAKD Fig. 3)", ylim=SHARE_YLIM),
        figure("abl_p1", _block_columns(columns, "train/abl/p1/"), "student weight p1 (epoch mean)",
               "ABL student weight per block"),
        gamma_trajectories(),
        block_accuracy(),
    ]
    return [p for p in made if p is not None]
