"""`adakd table` / `adakd plot` of a sweep, and `adakd compare` of runs: mean ± std over seeds, Δ paired by seed,
and the published number beside ours for a shipped grid."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from adakd.experiments.sweep import Cell, Sweep, SweepError

MISSING = "–"


@dataclass
class Layout:
    """Which grid axis gives the table's rows, columns and compared values (reference first)."""

    rows: str | None
    columns: str | None
    compare: str | None
    row_labels: list[str]
    column_labels: list[str]
    compare_labels: list[str]
    style: str  # "paper": one row per row value, cells 'ref / other (Δ)'; "rows": one row per (row, compared) pair
    names: dict[str, str] = field(default_factory=dict)  # display names

    def name(self, label: str) -> str:
        return self.names.get(label, label)


def layout(source: dict[str, Any], cells: list[Cell]) -> Layout:
    """The grid's `table:` section, or defaults: rows method, columns pair, compare strategy where they are axes."""
    axes = list(source.get("axes") or {})
    spec = source.get("table") or {}
    for key in ("rows", "columns", "compare"):
        if spec.get(key) is not None and spec[key] not in axes:
            raise SweepError(f"table.{key}: {spec[key]!r} is not an axis of the grid ({', '.join(axes)})")
    rows = spec.get("rows", "method" if "method" in axes else (axes[0] if axes else None))
    columns = spec.get("columns", "pair" if "pair" in axes and rows != "pair" else None)
    compare = spec.get("compare", "strategy" if "strategy" in axes and "strategy" not in (rows, columns) else None)
    grid_cells = [c for c in cells if c.role == "cell"]

    def labels(axis: str | None) -> list[str]:
        return list(dict.fromkeys(c.coords[axis] for c in grid_cells)) if axis else [""]

    return Layout(rows, columns, compare, labels(rows), labels(columns), labels(compare),
                  spec.get("layout", "paper" if compare else "rows"), dict(spec.get("labels") or {}))


@dataclass
class Entry:
    """The values of one table cell: seed -> accuracy for the finished runs, and what is still missing."""

    values: dict[int, float] = field(default_factory=dict)
    expected: int = 0
    states: list[str] = field(default_factory=list)

    def text(self) -> str:
        """'70.12 ± 0.30', with n when seeds are missing, or the state of an unfinished cell."""
        if not self.values:
            unfinished = [s for s in ("failed", "running", "interrupted") if s in self.states]
            return unfinished[0] if unfinished else MISSING
        values = list(self.values.values())
        text = f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
        return text + (f" (n={len(values)}/{self.expected})" if len(values) < self.expected else "")

    def mean(self) -> float | None:
        """The mean over the finished seeds, None when none finished."""
        return statistics.mean(self.values.values()) if self.values else None

    def std(self) -> float | None:
        """The sample standard deviation over the finished seeds, None below two."""
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None

    def status(self) -> str:
        """done (every seed), partial (some), else the state of the unfinished cells: failed, running,
        interrupted or pending."""
        if self.values:
            return "done" if len(self.values) >= self.expected else "partial"
        unfinished = [s for s in ("failed", "running", "interrupted") if s in self.states]
        return unfinished[0] if unfinished else "pending"


def paired_delta(reference: Entry, other: Entry) -> Entry:
    """other − reference for each seed both have (the paired difference the tables' Δ reports)."""
    seeds = sorted(set(reference.values) & set(other.values))
    return Entry({s: other.values[s] - reference.values[s] for s in seeds}, max(reference.expected, other.expected))


def signed(entry: Entry) -> str:
    """A Δ entry with its sign: '+0.41 ± 0.20'."""
    text = entry.text()
    return text if not entry.values or text.startswith("-") else "+" + text


class Results:
    """Every cell's summary, grouped the way the table lays them out."""

    def __init__(self, sweep: Sweep, metric: str = "last", topk: int = 1) -> None:
        if metric not in ("last", "best"):
            raise SweepError(f"--metric must be last or best, got {metric!r}")
        if topk not in (1, 5):
            raise SweepError(f"--topk must be 1 or 5, got {topk!r}")
        self.sweep, self.key = sweep, f"{metric}_acc{topk}"
        self.manifest = sweep.load()
        self.cells = sweep.cells()
        self.by_name = {c.name: c for c in self.cells}
        self.layout = layout(self.manifest["source"], self.cells)
        self.summaries = {c.name: self.sweep.result(c) for c in self.cells}
        self.states = {c.name: self.sweep.state(c)["state"] for c in self.cells}
        self.topk = topk
        finished = [summary for summary in self.summaries.values() if summary]
        if topk == 5 and finished and all(summary.get(self.key) is None for summary in finished):
            # Runs of 5 classes or fewer measure no top-5 (every sample would count).
            raise SweepError("--topk 5: the finished runs of this sweep measured no top-5 (a dataset of 5 classes or "
                             "fewer, where every sample is in its top 5); use --topk 1")

    def _grid_cells(self, row: str, column: str, compared: str) -> list[Cell]:
        lay = self.layout
        return [c for c in self.cells if c.role == "cell"
                and (lay.rows is None or c.coords.get(lay.rows) == row)
                and (lay.columns is None or c.coords.get(lay.columns) == column)
                and (lay.compare is None or c.coords.get(lay.compare) == compared)]

    def _entry(self, cells: list[Cell], key: str | None = None) -> Entry:
        entry = Entry(expected=len(cells))
        for cell in cells:
            summary = self.summaries[cell.name]
            value = summary.get(key or self.key) if summary else None
            if value is not None:
                entry.values[cell.seed] = float(value)
            else:
                entry.states.append(self.states[cell.name])
        return entry

    def entry(self, row: str, column: str, compared: str) -> Entry:
        """The seeds of one (row, column, compared value)."""
        return self._entry(self._grid_cells(row, column, compared))

    def baseline(self, role: str, column: str) -> Entry:
        """Teacher or student-alone accuracy under a column: their own cells, else the teachers' scores in the
        distill runs."""
        cells = [c for c in self.cells if c.role == "cell"
                 and (self.layout.columns is None or c.coords.get(self.layout.columns) == column)]
        linked = [getattr(c, f"{role}_cell") for c in cells]
        own = list(dict.fromkeys(n for n in linked if n))
        if own:
            return self._entry([self.by_name[n] for n in own])
        if role == "teacher" and self.topk == 1:
            # Teachers given as files were scored on the test split by each distill run (the same number each time).
            scores = [self.summaries[c.name].get("teacher_acc1") for c in cells if self.summaries[c.name]]
            scores = [s for s in scores if s is not None]
            return Entry({0: float(scores[0])}, 1) if scores else Entry(expected=1)
        return Entry()


def _paper_value(values: dict[str, Any], row: str, column: str, compared: str | None) -> float | None:
    """A published number: values[row][column][compared], or values[row][column] without a compare axis."""
    node: Any = values.get(row)
    if node is None:
        return None
    if isinstance(node, dict) and column in node:
        node = node[column]
    elif isinstance(node, dict) and "" == column and len(node) == 1:
        node = next(iter(node.values()))
    if isinstance(node, dict):
        node = node.get(compared) if compared is not None else None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _grid_rows(results: Results) -> list[tuple[str, list[str]]]:
    """(row label, [cell text per column]) of our numbers in the chosen layout."""
    lay = results.layout
    ref = lay.compare_labels[0]
    out: list[tuple[str, list[str]]] = []
    for role in ("teacher", "student"):
        entries = [results.baseline(role, col) for col in lay.column_labels]
        if any(e.expected for e in entries):
            out.append((role, [e.text() for e in entries]))
    for row in lay.row_labels:
        if lay.style == "paper" or lay.compare is None:
            texts = []
            for col in lay.column_labels:
                reference = results.entry(row, col, ref)
                parts = [reference.text()] if reference.expected else []
                for other in lay.compare_labels[1:]:
                    entry = results.entry(row, col, other)
                    if entry.expected:
                        parts.append(f"{entry.text()} ({signed(paired_delta(reference, entry))})"
                                     if reference.expected else entry.text())
                texts.append(" / ".join(parts) if parts else "")
            out.append((lay.name(row), texts))
        else:
            for compared in lay.compare_labels:
                texts = []
                for col in lay.column_labels:
                    entry = results.entry(row, col, compared)
                    reference = results.entry(row, col, ref)
                    text = entry.text() if entry.expected else ""
                    if compared != ref and entry.expected and reference.expected:
                        text += f" (Δ {signed(paired_delta(reference, entry))})"
                    texts.append(text)
                out.append((lay.name(row) if compared == ref else f"{lay.name(row)} + {lay.name(compared)}", texts))
    return out


def _paper_rows(results: Results, values: dict[str, Any], ours_minus: bool) -> list[tuple[str, list[str]]]:
    """The published numbers (or ours − published) in the same layout."""
    lay = results.layout
    out: list[tuple[str, list[str]]] = []

    def ours(row: str, col: str, compared: str | None) -> float | None:
        if row in ("teacher", "student"):
            return results.baseline(row, col).mean()
        return results.entry(row, col, compared if compared is not None else "").mean()

    def text(row: str, col: str, compared: str | None) -> str:
        published = _paper_value(values, row, col, compared)
        if published is None:
            return ""
        if not ours_minus:
            return f"{published:.2f}"
        mine = ours(row, col, compared)
        return MISSING if mine is None else f"{mine - published:+.2f}"

    for role in ("teacher", "student"):
        if role in values:
            out.append((role, [text(role, col, None) for col in lay.column_labels]))
    for row in lay.row_labels:
        if lay.compare is None:
            out.append((lay.name(row), [text(row, col, None) for col in lay.column_labels]))
            continue
        if lay.style == "paper":
            texts = []
            for col in lay.column_labels:
                parts = [text(row, col, c) for c in lay.compare_labels]
                parts = [p for p in parts if p]
                texts.append(" / ".join(parts))
            out.append((lay.name(row), texts))
        else:
            for compared in lay.compare_labels:
                out.append((lay.name(row) if compared == lay.compare_labels[0] else
                            f"{lay.name(row)} + {lay.name(compared)}", [text(row, col, compared)
                                                                       for col in lay.column_labels]))
    return [r for r in out if any(r[1])]


# LaTeX's special characters, escaped one character at a time so an escape is never escaped again.
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "%": r"\%",
                "_": r"\_", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
                ">": r"\textgreater{}", "|": r"\textbar{}"}
# The non-ASCII characters our tables and grid labels use, as pdflatex reads them without any package.
_TEX_SYMBOLS = {"±": r"$\pm$", "−": r"$-$", "–": "--", "—": "---", "×": r"$\times$", "·": r"$\cdot$",
                "≤": r"$\leq$", "≥": r"$\geq$", "→": r"$\to$", "≈": r"$\approx$", "°": r"$^\circ$", "µ": r"$\mu$",
                "…": r"\ldots{}", "’": "'", "‘": "`", "“": "``", "”": "''"}
# Greek letters LaTeX has a command for without amssymb (no omicron, no capitals that look Latin).
_TEX_GREEK_SMALL = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
                    "mu", "nu", "xi", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega")
_TEX_GREEK_CAPITALS = ("Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi", "Psi", "Omega")
_TEX_ACCENTS = {"\u0301": "'", "\u0300": "`", "\u0302": "^", "\u0308": '"', "\u0303": "~", "\u0304": "=",
                "\u0327": "c", "\u030c": "v", "\u0306": "u", "\u030a": "r"}
_SUBSCRIPT_DIGITS = {chr(0x2080 + d): str(d) for d in range(10)}
_SUPERSCRIPT_DIGITS = {"⁰": "0", "¹": "1", "²": "2", "³": "3", **{chr(0x2070 + d): str(d) for d in range(4, 10)}}


def _tex_char(char: str) -> str:
    """One non-ASCII character as pdflatex source: a math symbol, a Greek letter, an accented letter, else '?'."""
    import unicodedata

    if char in _TEX_SYMBOLS:
        return _TEX_SYMBOLS[char]
    if char in _SUBSCRIPT_DIGITS:
        return f"$_{_SUBSCRIPT_DIGITS[char]}$"
    if char in _SUPERSCRIPT_DIGITS:
        return f"$^{_SUPERSCRIPT_DIGITS[char]}$"
    name = unicodedata.name(char, "")
    if name.startswith("GREEK SMALL LETTER "):
        letter = name.removeprefix("GREEK SMALL LETTER ").lower().replace("lamda", "lambda")
        if letter in _TEX_GREEK_SMALL or letter == "final sigma":
            return f"$\\{'varsigma' if letter == 'final sigma' else letter}$"
    if name.startswith("GREEK CAPITAL LETTER "):
        letter = name.removeprefix("GREEK CAPITAL LETTER ").capitalize().replace("Lamda", "Lambda")
        if letter in _TEX_GREEK_CAPITALS:
            return f"$\\{letter}$"
    base, *marks = unicodedata.normalize("NFD", char)
    if base.isascii() and base.isalpha() and len(marks) == 1 and marks[0] in _TEX_ACCENTS:
        return f"\\{_TEX_ACCENTS[marks[0]]}{{{base}}}"
    return "?"


def tex_escape(text: str) -> str:
    """Text as a pdflatex table cell: specials escaped, ± Δ − – and other non-ASCII as LaTeX, a minus sign before a
    number typeset as one (ASCII only, so it compiles without inputenc or fontenc)."""
    import re

    pieces = []
    for char in text:
        if char in _TEX_SPECIAL:
            pieces.append(_TEX_SPECIAL[char])
        elif char.isascii():
            pieces.append(char)
        else:
            pieces.append(_tex_char(char))
    # '-0.69' and '(-0.69', not 'wrn-40-2': a hyphen before a digit that does not follow a word is a minus sign.
    return re.sub(r"(?<![\w.}$])-(?=\d)", r"$-$", "".join(pieces))


def _tex_comment(text: str) -> str:
    """Prose (a title, a note) as LaTeX comment lines, in ASCII so any engine and editor reads it."""
    import unicodedata

    folded = text.translate(str.maketrans({"±": "+/-", "Δ": "Delta", "−": "-", "–": "-", "—": "-"}))
    folded = unicodedata.normalize("NFKD", folded).encode("ascii", "replace").decode("ascii")
    return "\n".join(f"% {line}" for line in folded.splitlines())


def _render(header: list[str], rows: list[tuple[str, list[str]]], fmt: str) -> str:
    """One block of a table as markdown or as a booktabs tabular."""
    if fmt == "latex":
        lines = [r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(tex_escape(t) for t in [label, *texts]) + r" \\" for label, texts in rows]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join([label, *texts]) + " |" for label, texts in rows]
    return "\n".join(lines)


CSV_COLUMNS = ("row", "column", "compare", "status", "n", "n_expected", "mean", "std", "delta_mean", "delta_std",
               "delta_n", "published", "ours_minus_published")


def _csv_records(results: Results, values: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (row, column, compared value) that has cells, teacher and student first, numbers unrounded."""
    lay = results.layout
    reference_label = lay.compare_labels[0]

    def record(row: str, column: str, compared: str, entry: Entry, reference: Entry | None,
               published: float | None) -> dict[str, Any]:
        delta = paired_delta(reference, entry) if reference is not None and reference.expected else None
        mean = entry.mean()
        return {"row": row, "column": column, "compare": compared, "status": entry.status(),
                "n": len(entry.values), "n_expected": entry.expected, "mean": mean, "std": entry.std(),
                "delta_mean": delta.mean() if delta else None, "delta_std": delta.std() if delta else None,
                "delta_n": len(delta.values) if delta else None, "published": published,
                "ours_minus_published": mean - published if mean is not None and published is not None else None}

    records = []
    for role in ("teacher", "student"):
        for column in lay.column_labels:
            entry = results.baseline(role, column)
            if entry.expected:
                records.append(record(role, column, "", entry, None, _paper_value(values, role, column, None)))
    for row in lay.row_labels:
        for column in lay.column_labels:
            reference = results.entry(row, column, reference_label)
            for compared in lay.compare_labels:
                entry = results.entry(row, column, compared)
                if not entry.expected:
                    continue  # excluded from the grid: no cell, no record
                published = _paper_value(values, row, column, compared if lay.compare else None)
                records.append(record(row, column, compared, entry,
                                      reference if compared != reference_label else None, published))
    return records


def _render_csv(records: list[dict[str, Any]]) -> str:
    """The records under CSV_COLUMNS; floats at full precision (repr), a missing number as an empty field."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in r.items()} for r in records)
    return buffer.getvalue().rstrip("\n")


FORMATS = ("md", "csv", "latex")


def format_table(root: str | Path, metric: str = "last", fmt: str = "md", topk: int = 1) -> str:
    """The sweep as the paper lays it out, then the published numbers and ours − published (shipped grids).

    md: the title line, then markdown tables (ours; for a grid with a `paper:` block also published and ours −
    published; then the failed cells). latex: the same blocks, each title a `%` comment and each table a booktabs
    `tabular` (needs `\\usepackage{booktabs}`) in ASCII, ± as `$\\pm$`, specials escaped. csv: one tidy row per
    (row, column, compare) value of the layout's axes (teacher and student rows first; an axis the table does not use
    is empty), columns CSV_COLUMNS: status (done, partial, failed, running, interrupted, pending), n of n_expected
    seeds, mean and std over the finished seeds, delta_mean/delta_std/delta_n of the difference to the compare axis's
    first value paired by seed (empty for that value), published and ours_minus_published where the grid's `paper:`
    block has a number; numbers at full precision, empty where there is none (std needs two seeds)."""
    if fmt not in FORMATS:
        raise SweepError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    results = Results(Sweep(root), metric, topk)
    lay = results.layout
    paper = results.manifest["source"].get("paper") or {}
    values = paper.get("values" if topk == 1 else "values_acc5") or {}
    if fmt == "csv":
        return _render_csv(_csv_records(results, values))
    # In LaTeX the prose lines become comments: the tabulars then compile as written, titles kept for the reader.
    prose = _tex_comment if fmt == "latex" else str
    header = [lay.rows or "run", *[lay.name(c) or f"top-{topk} {metric}" for c in lay.column_labels]]
    seeds = sorted({c.seed for c in results.cells if c.role == "cell"})
    done = sum(1 for c in results.cells if results.states[c.name] == "done")
    compare = (f"; cells '{' / '.join(lay.name(c) for c in lay.compare_labels)}', Δ = each − "
               f"{lay.name(lay.compare_labels[0])} paired by seed" if lay.compare else "")
    title = (f"sweep {results.manifest['grid']} ({root}): {done}/{len(results.cells)} cells done; top-{topk} % at the "
             f"{metric} epoch, mean ± std over {len(seeds)} seed(s){compare}")
    if fmt == "latex":
        title += "\n(the tabulars need \\usepackage{booktabs})"
    blocks = [prose(title), _render(header, _grid_rows(results), fmt)]
    if values:
        label = f"published: {paper.get('source', 'the paper')}; metric {paper.get('metric', 'not stated')}, " \
                f"{paper.get('runs', 'runs not stated')}" + (f"; {paper['note']}" if paper.get("note") else "")
        if paper.get("metric") not in (None, metric):
            label += f" (ours above: {metric} epoch)"
        blocks += [prose(label), _render(header, _paper_rows(results, values, False), fmt),
                   prose(f"ours − published (our mean at the {metric} epoch)"),
                   _render(header, _paper_rows(results, values, True), fmt)]
    failed = [c.name for c in results.cells if results.states[c.name] == "failed"]
    if failed:
        blocks.append(prose(f"failed cells ({len(failed)}): " + ", ".join(failed[:5])
                            + (" ..." if len(failed) > 5 else "") + f"; logs under {Path(root) / 'logs'}"))
    return "\n\n".join(blocks)


def plot_sweep(root: str | Path, out: str | Path | None = None, metric: str = "last") -> list[Path]:
    """delta.png: Δ of every compared value against the reference per table cell, mean with ± std error bars;
    without a compare axis, accuracy.png: mean ± std per cell."""
    from adakd.experiments.plots import pyplot

    plt = pyplot()
    results = Results(Sweep(root), metric)
    lay = results.layout
    folder = Path(out) if out else Path(root) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    groups = [(r, c) for r in lay.row_labels for c in lay.column_labels]
    names = [" ".join(x for x in (lay.name(r), lay.name(c)) if x) for r, c in groups]
    series: list[tuple[str, list[Entry]]] = []
    if lay.compare:
        ref = lay.compare_labels[0]
        for other in lay.compare_labels[1:]:
            series.append((f"{lay.name(other)} − {lay.name(ref)}",
                           [paired_delta(results.entry(r, c, ref), results.entry(r, c, other)) for r, c in groups]))
        ylabel, file = f"Δ top-1 % ({metric} epoch), paired by seed", "delta.png"
    else:
        series.append(("top-1", [results.entry(r, c, "") for r, c in groups]))
        ylabel, file = f"top-1 % ({metric} epoch)", "accuracy.png"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * len(series) + 2), 4.5))
    width = 0.8 / len(series)
    for k, (label, entries) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        means = [e.mean() if e.values else 0.0 for e in entries]
        errors = [statistics.stdev(e.values.values()) if len(e.values) > 1 else 0.0 for e in entries]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=label)
    if lay.compare:
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(names, rotation=45 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(f"sweep {results.manifest['grid']}: mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    path = folder / file
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None, metric: str = "test/acc1"
                 ) -> tuple[str, Path | None]:
    """A table of runs side by side (last, best) and their test accuracy curves overlaid in one PNG."""
    from adakd.experiments.plots import read_metrics, run_name

    rows, curves = [], []
    for run in run_dirs:
        folder = Path(run)
        if (folder / "pipeline.yaml").is_file():  # an `adakd abl` folder: its first final run
            finals = sorted(folder.glob("final_seed*"))
            folder = finals[0] if finals else folder
        metrics = read_metrics(folder)
        summary_file = folder / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        scored = [r for r in metrics if metric in r]
        last = scored[-1][metric] if scored else None
        best = max(scored, key=lambda r: r[metric]) if scored else None
        rows.append((run_name(folder), len(metrics), last, best, summary))
        curves.append((run_name(folder), [r["epoch"] for r in scored], [r[metric] for r in scored]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'run':<{width}}  {'epochs':>6}  {'last':>7}  {'best (epoch)':>14}"]
    for name, epochs, last, best, _ in rows:
        best_text = f"{best[metric]:.2f} ({int(best['epoch'])})" if best else MISSING
        lines.append(f"{name:<{width}}  {epochs:>6}  {last if last is None else f'{last:.2f}':>7}  {best_text:>14}")
    path = None
    try:
        from adakd.experiments.plots import PlottingUnavailable, pyplot

        plt = pyplot()
    except PlottingUnavailable:
        lines.append("(no figure: matplotlib is not installed)")
        return "\n".join(lines), None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, epochs, values in curves:
        ax.plot(epochs, values, label=name, **({"marker": "o", "markersize": 4} if len(epochs) < 20 else {}))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(curves)} runs compared")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) if out else Path("compare.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    lines.append(f"curves: {path}")
    return "\n".join(lines), path
