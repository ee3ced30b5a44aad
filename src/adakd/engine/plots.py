"""Figures of a run directory: loss terms and accuracy per epoch, SAKD's per-spot shares (the paper's Fig. 3)."""
from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """metrics.csv of a run as rows of floats (empty cells dropped)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: give the folder of a run (it holds metrics.csv)")
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write PNG figures next to the metrics (or into `out`) and return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'adakd[plot]'") from None
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.csv has no epochs yet")
    folder = Path(out) if out else Path(run_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in rows]
    columns = list(rows[0])

    def figure(name: str, keys: list[str], ylabel: str, title: str) -> Path | None:
        keys = [k for k in keys if any(k in r for r in rows)]
        if not keys:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for key in keys:
            ax.plot(epochs, [r.get(key, float("nan")) for r in rows], label=key.split("/", 1)[-1])
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    skip = {"train/loss", "train/acc1", "train/images_per_s"}
    terms = [c for c in columns if c.startswith("train/") and c not in skip and "/share/" not in c
             and "/policy_p/" not in c and not c.startswith("train/gumbel")]
    made = [
        figure("accuracy", ["train/acc1", "test/acc1", "test/acc5"], "top-1 / top-5 (%)", "accuracy"),
        figure("losses", ["train/loss", *terms], "loss (weighted term)", "training loss terms"),
        figure("spot_shares", [c for c in columns if "/share/" in c], "share of samples distilled",
               "distilled share per spot (SAKD Fig. 3)"),
    ]
    return [p for p in made if p is not None]
