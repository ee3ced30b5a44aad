"""The README's Python example (your own nn.Module and Dataset, distilled with SAKD) runs as it stands."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The python block of the section 'Your own models and data'."""
    section = README.read_text().split("## Your own models and data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold exactly one python example"
    return blocks[0]


@pytest.mark.slow  # a separate process (or a real run) per check: CI runs it, the inner loop does not
def test_readme_example_distils_a_users_model_on_a_users_dataset(tmp_path, monkeypatch, capsys):
    from adakd import data, models

    monkeypatch.chdir(tmp_path)  # it writes runs/ where it is started
    monkeypatch.setattr(data, "_MODULES", dict(data._MODULES))  # its registrations end with the test
    monkeypatch.setattr(models.registry.MODELS, "_builders", dict(models.registry.MODELS._builders))
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme_example"})
    student, teacher = map(float, capsys.readouterr().out.strip().splitlines()[-1].split())
    assert student > 15.0 and teacher > 15.0  # 10 classes: chance is 10 %; measured 37.5 % and 29.7 %
    assert (tmp_path / "runs" / "s" / "summary.json").is_file()
    assert pytest.approx(student) == __import__("json").loads((tmp_path / "runs" / "s" / "summary.json").read_text())[
        "last_acc1"]
