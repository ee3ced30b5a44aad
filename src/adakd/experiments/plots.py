"""Figures of a run directory: accuracy and loss terms per epoch, then the figures its strategy declares as data
(`Strategy.figures`: SAKD's per-spot shares, ABL's student weights and per-block head accuracy, ...)."""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

import yaml

from adakd.strategies.base import Figure

# A series with fewer points gets markers: a 1-epoch curve is a single point, which a bare line does not draw.
MARKERS_BELOW = 20


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


def read_run_file(run_dir: str | Path, name: str) -> list[dict[str, float | str]] | None:
    """A CSV file a strategy writes into the run folder (numbers as floats, other cells as text), or None if absent."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None

    def cell(value: str) -> float | str:
        try:
            return float(value)
        except ValueError:
            return value

    with open(path, newline="") as handle:
        return [{k: cell(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def run_strategy(run_dir: str | Path) -> str | None:
    """strategy.name of the run's config.yaml (None without a readable one)."""
    path = Path(run_dir) / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    strategy = values.get("strategy") if isinstance(values, dict) else None
    name = strategy.get("name") if isinstance(strategy, dict) else None
    return name if isinstance(name, str) else None


def declared(run_dir: str | Path) -> tuple[list[Figure], set[str]]:
    """The figures to draw for a run and the parts of train/ column names that are no loss terms.

    The run's strategy (config.yaml) comes first, then every registered strategy: a folder without config.yaml, or
    one holding columns another strategy logged, still gets their figures. Each is drawn only where its columns are.
    """
    from adakd import strategies
    from adakd.registry import UnknownNameError

    names = [run_strategy(run_dir), *strategies.available()]
    figures: dict[str, Figure] = {}
    not_losses: set[str] = set()
    for name in dict.fromkeys(n for n in names if n is not None):
        try:
            cls = strategies.get(name)
        except UnknownNameError:
            continue  # a strategy of another version or plugin: its columns get the generic figures only
        for figure in cls.figures:
            figures.setdefault(figure.file, figure)
        not_losses.update(cls.not_loss_columns)
    return list(figures.values()), not_losses


def run_name(run_dir: str | Path) -> str:
    """The run's name for figure titles: its folder name, after its pipeline's for a stage of a pipeline folder."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}" if (path.parent / "pipeline.yaml").is_file() else path.name


def pipeline_stages(root: str | Path) -> list[Path]:
    """Stage folders of a pipeline folder that hold metrics.csv: search first, then the final runs by seed."""
    def order(path: Path) -> tuple[int, int, str]:
        seed = re.fullmatch(r"final_seed(\d+)", path.name)
        return (0 if path.name == "search" else 1, int(seed.group(1)) if seed else 0, path.name)

    return sorted((p for p in Path(root).iterdir() if (p / "metrics.csv").is_file()), key=order)


def plot_pipeline(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Plot every stage of a pipeline folder into <stage>/plots (or `out`/<stage>); return every path."""
    stages = [stage for stage in pipeline_stages(root) if read_metrics(stage)]
    if not stages:
        raise ValueError(f"{str(root)!r} is a pipeline folder (`adakd abl`), but none of its stages has finished an "
                         "epoch (no metrics rows yet): plot it once the search has logged an epoch")
    paths: list[Path] = []
    for stage in stages:
        paths += plot_run(stage, Path(out) / stage.name if out else None)
    return paths


def _labels(paths: Sequence[Path]) -> list[str]:
    """Run folder names, or the paths as given when two runs share a folder name."""
    names = [p.resolve().name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _compared_figure(figures: list[Figure], rows: list[dict[str, float]]) -> Figure | None:
    """The figure --compare draws: the first declared with `compare` that this run has columns for, else the first."""
    candidates = [f for f in figures if f.compare]
    return next((f for f in candidates if f.by_blocks(rows) is not None), candidates[0] if candidates else None)


def plot_run(run_dir: str | Path, out: str | Path | None = None, compare: Sequence[str | Path] = ()) -> list[Path]:
    """Write PNG figures next to the metrics (or into `out`) and return their paths.

    `compare` names other run folders whose per-block values are drawn beside this run's in the figure declared with
    `compare` (ABL's block_accuracy.png). A pipeline folder (pipeline.yaml, no metrics.csv) plots each of its
    stages (see `plot_pipeline`).
    """
    plt = pyplot()
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    folder_given = Path(run_dir)
    if not (folder_given / "metrics.csv").is_file():
        if (folder_given / "pipeline.yaml").is_file():
            if compare:
                raise ValueError(f"--compare takes one run, but {str(run_dir)!r} is a pipeline folder (`adakd abl`): "
                                 f"give one of its stages, e.g. {str(folder_given / 'final_seed0')!r}")
            return plot_pipeline(run_dir, out)
        what = "is neither" if folder_given.exists() else "does not exist, so it is neither"
        raise FileNotFoundError(f"{str(run_dir)!r} {what} a run folder (it would hold metrics.csv) nor a pipeline "
                                "folder (pipeline.yaml, as `adakd abl` writes): give the folder of a run or of a "
                                "pipeline")
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.csv has no epochs yet")
    figures, not_losses = declared(run_dir)
    # Read every comparison run first, so a wrong path fails before any figure is written.
    compared = [(Path(path), read_metrics(path)) for path in compare]
    comparing = _compared_figure(figures, rows) if compare else None
    if compare and comparing is None:
        raise ValueError("--compare draws a per-block figure, but no strategy declares one")
    for path, other in compared:
        if comparing.by_blocks(other) is None:
            raise ValueError(f"{str(path)!r} has no columns of {comparing.file}.png ({comparing.columns!r}) in its "
                             "last metrics row: --compare takes runs that log them")
    if compared and comparing.by_blocks(rows) is None:
        raise ValueError(f"--compare draws {comparing.file}.png, but {str(run_dir)!r} has no columns of it "
                         f"({comparing.columns!r})")
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

    def per_epoch(file: str, keys: list[str], ylabel: str, what: str, label=lambda key: key.split("/", 1)[-1],
                  ylim: tuple[float, float] | None = None) -> Path | None:
        keys = [k for k in keys if any(k in r for r in rows)]
        if not keys:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for key in keys:
            ax.plot(epochs, [r.get(key, float("nan")) for r in rows], label=label(key),
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

    def band_end(figure: Figure, steps_rows: list[dict[str, float | str]]) -> float | None:
        band = figure.band
        end = band.end(Path(run_dir)) if band.end is not None else None
        if end is None and band.until is not None:  # the first row of the next phase, when the run does not say
            column, value = band.until
            marked = [r[figure.x] for r in steps_rows if r.get(column) == value]
            end = min(marked) if marked and len(marked) < len(steps_rows) else None
        return end

    def per_step(figure: Figure) -> Path | None:
        steps_rows = read_run_file(run_dir, figure.source)
        keys = figure.pick(steps_rows[0]) if steps_rows else []
        if not keys:
            return None
        steps = [r[figure.x] for r in steps_rows]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        colors = matplotlib.colormaps["viridis"].resampled(len(keys))
        for index, key in enumerate(keys):
            ax.plot(steps, [r.get(key, float("nan")) for r in steps_rows], color=colors(index),
                    label=figure.legend(key), **marker(sum(key in r for r in steps_rows)))
        end = band_end(figure, steps_rows) if figure.band is not None else None
        band = []
        if end is not None and end > steps[0]:
            band = [ax.axvspan(steps[0], end, color="grey", alpha=0.15, label=figure.band.label)]
            ax.axvline(end, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(figure.xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(figure.ylabel)
        if figure.ylim is not None:
            ax.set_ylim(*figure.ylim)
        title(ax, figure.title)
        ax.grid(alpha=0.3)
        if len(keys) <= 12:
            ax.legend(fontsize="small", ncol=1 + len(keys) // 7)
        else:  # a colour bar names many series better than a legend
            scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.5, len(keys) + 0.5), colors)
            fig.colorbar(scale, ax=ax, label="block" if figure.by_block else "series")
            if band:
                ax.legend(handles=band, fontsize="small")
        return save(fig, figure.file)

    def by_blocks(figure: Figure) -> Path | None:
        runs = [(Path(run_dir), rows), *(compared if figure is comparing else [])]
        curves = [(label, figure.by_blocks(r)) for label, (_, r) in zip(_labels([p for p, _ in runs]), runs)]
        if curves[0][1] is None:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, (blocks, values) in curves:
            ax.plot(blocks, values, marker="o", label=label)
        ax.set_xlabel(figure.xlabel)
        ax.set_ylabel(figure.ylabel)
        if figure.ylim is not None:
            ax.set_ylim(*figure.ylim)
        title(ax, figure.title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return save(fig, figure.file)

    def draw(figure: Figure) -> Path | None:
        if figure.kind == "steps":
            return per_step(figure)
        if figure.kind == "blocks":
            return by_blocks(figure)
        return per_epoch(figure.file, figure.pick(columns), figure.ylabel, figure.title, label=figure.legend,
                         ylim=figure.ylim)

    skip = {"train/loss", "train/acc1", "train/images_per_s"}
    terms = [c for c in columns if c.startswith("train/") and c not in skip and not any(s in c for s in not_losses)]
    made = [
        per_epoch("accuracy", ["train/acc1", "test/acc1", "test/acc5"],
                  "top-1 / top-5 (%)" if "test/acc5" in columns else "top-1 (%)", "accuracy", label=lambda key: key),
        per_epoch("losses", ["train/loss", *terms], "loss (weighted term)", "training loss terms"),
        *(draw(figure) for figure in figures),
    ]
    return [p for p in made if p is not None]
