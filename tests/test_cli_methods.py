"""`adakd methods`: every registered distiller, strategy and component, with the distillers' defaults."""
from __future__ import annotations

import adakd.distillers as D
import adakd.strategies as S
from adakd.cli import first_paragraph, main, spot_text
from adakd.strategies import components
from cli_checks import fails


def listed(capsys, *argv: str) -> dict[str, str]:
    """The rows of `adakd methods ARGV`, by their first word."""
    assert main(["methods", *argv]) == 0
    rows = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    return {row.split()[0]: row for row in rows}


def test_every_registered_name_is_listed_once_with_the_distillers_defaults(capsys):
    rows = listed(capsys)
    assert set(rows) == set(D.available()) | set(S.available()) | set(components.available())
    assert rows["kd"].split()[1:5] == ["0.1", "/", "0.9", "logits"]
    assert " 1 / 0 " in rows["fsp"] and "stem + every stage" in rows["fsp"]
    assert " 0.1 / 1 " in rows["sskd"] and "pooled + logits" in rows["sskd"]
    assert "learned curriculum temperature" in rows["ctkd"]


def test_a_pattern_filters_and_no_match_is_one_error_line(capsys):
    assert set(listed(capsys, "d*")) == {"dkd", "dist", "dist_plus", "dot"}
    fails(capsys, ["methods", "zzz*"], "no distiller, strategy or component matches 'zzz*'")


def test_spot_words_and_one_line_summaries():
    assert [spot_text(s) for s in (-1, -2, -3, 0, 2, "stages")] == [
        "logits", "pooled", "last stage", "stem", "stage2", "every stage"]
    assert first_paragraph("One line\n    wrapped here.\n\n    Details.") == "One line wrapped here."
    assert first_paragraph("x" * 200, limit=10) == "x" * 9 + "…"
