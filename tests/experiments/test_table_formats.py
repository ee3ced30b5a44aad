"""`adakd table --format csv|latex` read back: the CSV's numbers against hand arithmetic on a sweep folder written
by hand (no training), the LaTeX checked for what makes pdflatex fail, and compiled when a TeX engine is installed."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from adakd.cli import main
from adakd.experiments.sweep import Sweep, plan
from adakd.experiments.sweep_report import CSV_COLUMNS, format_table, tex_escape

PAIR = "resnet56-resnet20"
# Display names with LaTeX's specials, a unicode minus and a Greek letter: what a grid's `labels:` may hold.
AT_NAME = "AT_x & 50% #1 − γ"
# (method, strategy) -> seed -> last top-1; a missing seed is unfinished (see STATES).
ACCURACY = {("at", "standard"): {0: 70.0, 1: 71.0, 2: 72.5},
            ("at", "sakd"): {0: 71.0, 1: 71.5},
            ("kd", "standard"): {0: 69.0, 1: 69.5, 2: 70.25},
            ("kd", "sakd"): {}}
STATES = {("at", "sakd", 2): "interrupted", ("kd", "sakd", 0): "failed", ("kd", "sakd", 1): "failed",
          ("kd", "sakd", 2): "failed"}
PUBLISHED = {"teacher": {PAIR: 74.0}, "at": {PAIR: {"standard": 70.0, "sakd": 71.0}}, "kd": {PAIR: {"standard": 70.5}}}
TEACHER = 75.0


def write_sweep(root: Path) -> Path:
    """A finished-looking sweep folder written by hand: summaries, a failed and an interrupted cell, student
    baselines not started."""
    grid = {"presets": ["cifar100", "demo"], "overrides": {"model.name": "resnet8", "teacher.name": "resnet8",
                                                          "teacher.weights": "t.pth"},
            "axes": {"pair": [PAIR], "method": ["at", "kd"], "strategy": ["standard", "sakd"]},
            "seeds": 3, "baselines": ["student"],
            "table": {"rows": "method", "columns": "pair", "compare": "strategy", "labels": {"at": AT_NAME}},
            "paper": {"source": "a paper", "metric": "last", "runs": "mean of 3", "values": PUBLISHED}}
    out = root / "sweep"
    sweep = Sweep(out)
    sweep.write_plan("hand", grid, [], {}, plan(grid, "hand", out))
    for (method, strategy), by_seed in ACCURACY.items():
        for seed in range(3):
            name = f"pair-{PAIR}_method-{method}_strategy-{strategy}_seed{seed}"
            if seed in by_seed:
                (out / "cells" / name).mkdir(parents=True)
                (out / "cells" / name / "summary.json").write_text(json.dumps(
                    {"last_acc1": by_seed[seed], "best_acc1": by_seed[seed] + 1, "teacher_acc1": TEACHER}))
            elif STATES.get((method, strategy, seed)) == "interrupted":
                (out / "cells" / name).mkdir(parents=True)  # started, no summary: a killed run
            elif STATES.get((method, strategy, seed)) == "failed":
                sweep.set_state(name, "failed", error="RuntimeError: boom")
    return out


def expected_records() -> dict[tuple[str, str, str], dict[str, float | int | str | None]]:
    """What each CSV row must hold, from statistics on ACCURACY by hand."""
    def stats(values: list[float]) -> tuple[float | None, float | None]:
        return (statistics.mean(values) if values else None, statistics.stdev(values) if len(values) > 1 else None)

    rows = {("teacher", PAIR, ""): {"status": "done", "n": 1, "n_expected": 1, "mean": TEACHER, "std": None,
                                    "delta_mean": None, "delta_std": None, "delta_n": None, "published": 74.0,
                                    "ours_minus_published": TEACHER - 74.0},
            ("student", PAIR, ""): {"status": "pending", "n": 0, "n_expected": 3, "mean": None, "std": None,
                                    "delta_mean": None, "delta_std": None, "delta_n": None, "published": None,
                                    "ours_minus_published": None}}
    status = {("at", "standard"): "done", ("at", "sakd"): "partial", ("kd", "standard"): "done",
              ("kd", "sakd"): "failed"}
    for (method, strategy), by_seed in ACCURACY.items():
        mean, std = stats(list(by_seed.values()))
        delta_mean = delta_std = delta_n = None
        if strategy != "standard":
            reference = ACCURACY[method, "standard"]
            deltas = [by_seed[s] - reference[s] for s in sorted(set(by_seed) & set(reference))]
            (delta_mean, delta_std), delta_n = stats(deltas), len(deltas)
        published = PUBLISHED[method][PAIR].get(strategy)
        rows[method, PAIR, strategy] = {
            "status": status[method, strategy], "n": len(by_seed), "n_expected": 3, "mean": mean, "std": std,
            "delta_mean": delta_mean, "delta_std": delta_std, "delta_n": delta_n, "published": published,
            "ours_minus_published": mean - published if mean is not None and published is not None else None}
    return rows


def test_csv_is_tidy_and_numbers_match_hand_arithmetic(tmp_path, capsys):
    out = write_sweep(tmp_path)
    text = format_table(out, fmt="csv")
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    got = {(r["row"], r["column"], r["compare"]): r for r in reader}
    expected = expected_records()
    assert list(got) == list(expected)  # teacher, student, then rows x columns x compared, in the table's order
    for key, want in expected.items():
        row = got[key]
        assert row["status"] == want["status"], key
        for column in ("n", "n_expected", "delta_n"):
            assert row[column] == ("" if want[column] is None else str(want[column])), (key, column)
        for column in ("mean", "std", "delta_mean", "delta_std", "published", "ours_minus_published"):
            if want[column] is None:
                assert row[column] == "", (key, column)  # missing, running, failed: empty, never a dash or text
            else:
                assert float(row[column]) == pytest.approx(want[column], abs=1e-9), (key, column)
    # Full precision, not the md table's two decimals: at/sakd's Δ over seeds 0 and 1 is 0.75 ± 0.3535533905932738.
    assert float(got["at", PAIR, "sakd"]["delta_std"]) == statistics.stdev([1.0, 0.5])
    # The CLI prints the same text.
    assert main(["table", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text


def test_csv_best_metric_and_no_compare_axis(tmp_path):
    """--metric best reads best_acc1; a grid without a compare axis leaves compare and the Δ columns empty."""
    out = write_sweep(tmp_path)
    rows = {(r["row"], r["compare"]): r for r in csv.DictReader(io.StringIO(format_table(out, "best", "csv")))}
    assert float(rows["at", "standard"]["mean"]) == pytest.approx(statistics.mean([71.0, 72.0, 73.5]), abs=1e-9)
    grid = {"presets": ["cifar100", "demo"], "overrides": {"model.name": "resnet8", "teacher.name": "resnet8",
                                                          "teacher.weights": "t.pth"},
            "axes": {"method": ["kd"]}, "seeds": 2}
    flat = tmp_path / "flat"
    Sweep(flat).write_plan("flat", grid, [], {}, plan(grid, "flat", flat))
    for seed, value in ((0, 60.0), (1, 61.0)):
        (flat / "cells" / f"method-kd_seed{seed}").mkdir(parents=True)
        (flat / "cells" / f"method-kd_seed{seed}" / "summary.json").write_text(json.dumps({"last_acc1": value}))
    records = list(csv.DictReader(io.StringIO(format_table(flat, fmt="csv"))))
    # The teacher file was not scored by these summaries (no teacher_acc1): its row says so, numbers empty.
    assert [(r["row"], r["column"], r["compare"], r["status"], r["n"]) for r in records] == [
        ("teacher", "", "", "pending", "0"), ("kd", "", "", "done", "2")]
    kd = records[1]
    assert float(kd["mean"]) == 60.5 and float(kd["std"]) == statistics.stdev([60.0, 61.0])
    assert kd["delta_mean"] == kd["delta_n"] == kd["published"] == records[0]["mean"] == ""


def latex_problems(latex: str) -> list[str]:
    """What would make pdflatex fail or print the wrong glyph, outside comments."""
    problems = []
    body = [line for line in latex.splitlines() if not line.lstrip().startswith("%")]
    columns = None
    for line in body:
        if any(ord(c) > 127 for c in line):
            problems.append(f"non-ASCII: {line}")
        unescaped = re.sub(r"\\.", "", line)  # drop every escaped character (\%, \&, \_, \{, ...)
        if "%" in unescaped:
            problems.append(f"unescaped %, the rest of the line would be a comment: {line}")
        if "_" in unescaped.replace("$_", "") or "#" in unescaped:
            problems.append(f"unescaped _ or #: {line}")
        if unescaped.count("{") != unescaped.count("}"):
            problems.append(f"unbalanced braces: {line}")
        if unescaped.count("$") % 2:
            problems.append(f"unbalanced math: {line}")
        if line.startswith(r"\begin{tabular}"):
            columns = len(re.search(r"\{tabular\}\{([lcr]+)\}", line).group(1))
        elif line.endswith(r"\\"):
            if unescaped.count("&") != columns - 1:
                problems.append(f"{unescaped.count('&')} & for {columns} columns: {line}")
    if latex.count(r"\begin{tabular}") != latex.count(r"\end{tabular}"):
        problems.append("unbalanced tabular")
    return problems


def test_latex_is_ascii_escaped_and_every_row_fits_its_columns(tmp_path):
    out = write_sweep(tmp_path)
    latex = format_table(out, fmt="latex")
    assert latex_problems(latex) == []
    assert latex.count(r"\begin{tabular}") == 3  # ours, published, ours − published
    # The title and the failed cells are comments; ± is math; the label's specials escaped, − and γ as math.
    assert latex.startswith("% sweep hand (")
    assert "mean +/- std" in latex.splitlines()[0] and "% failed cells (3)" in latex
    assert r"\usepackage{booktabs}" in latex.splitlines()[1]
    at_row = next(line for line in latex.splitlines() if line.startswith("AT"))
    assert at_row == (r"AT\_x \& 50\% \#1 $-$ $\gamma$ & 71.17 $\pm$ 1.26 / 71.25 $\pm$ 0.35 (n=2/3) "
                      r"(+0.75 $\pm$ 0.35 (n=2/3)) \\")
    assert r"kd & 69.58 $\pm$ 0.63 / failed (--) \\" in latex  # the md's '–' (nothing to pair) as an en dash
    assert r"kd & $-$0.92 \\" in latex  # ours − published: a minus sign, not a hyphen
    # The markdown keeps the label and the symbols as they are.
    markdown = format_table(out)
    assert f"| {AT_NAME} | 71.17 ± 1.26 / 71.25 ± 0.35 (n=2/3) (+0.75 ± 0.35 (n=2/3)) |" in markdown


def test_tex_escape_by_hand():
    assert tex_escape("a_b & c% #d $e {f} ~^\\") == \
        r"a\_b \& c\% \#d \$e \{f\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    assert tex_escape("−0.5 ± 0.1 (Δ -0.2) – Δ p₁ é wrn-40-2 x-1") == \
        r"$-$0.5 $\pm$ 0.1 ($\Delta$ $-$0.2) -- $\Delta$ p$_1$ \'{e} wrn-40-2 x-1"
    assert tex_escape("日") == "?"  # no package needed: an unknown character becomes ?, never a compile error


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine installed (pdflatex)")
def test_latex_compiles_with_pdflatex(tmp_path):
    out = write_sweep(tmp_path)
    have_booktabs = subprocess.run(["kpsewhich", "booktabs.sty"], capture_output=True, text=True).stdout.strip()
    # texlive-latex-base lacks booktabs: stand-in rules keep the check meaningful there.
    preamble = r"\usepackage{booktabs}" if have_booktabs else \
        r"\newcommand\toprule{\hline}\newcommand\midrule{\hline}\newcommand\bottomrule{\hline}"
    document = tmp_path / "table.tex"
    # Every character tex_escape maps, so no mapping names a command pdflatex lacks.
    symbols = tex_escape("± − – — × · ≤ ≥ → ≈ ° µ … ’‘“” ₀₉ ²⁹ αβγδεζηθικλμνξπρσςτυφχψω ΓΔΘΛΞΠΣΥΦΨΩ éèêëñāçšăå "
                         "日 a_b & c% #d $e {f} ~^\\ <|> -1 wrn-40-2")
    document.write_text("\\documentclass{article}\n" + preamble + "\n\\begin{document}\n"
                        + format_table(out, fmt="latex") + "\n\n" + symbols + "\n\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "table.pdf").stat().st_size > 0
    log = (tmp_path / "table.log").read_text(errors="replace")
    assert "Missing character" not in log and "Undefined control sequence" not in log
