"""Build hook: record the git commit a wheel was built from (meta.json of every run reports it)."""
from __future__ import annotations

import json
import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


def _commit() -> dict | None:
    """{'commit', 'dirty'} of the checkout being built, or None outside git."""
    try:
        run = dict(capture_output=True, text=True, timeout=10, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)} if commit else None


class BuildPyWithCommit(build_py):
    """build_py that also writes adakd/_source_commit.json into the built package."""

    def run(self) -> None:
        super().run()
        commit = _commit()
        if commit is not None and not self.dry_run:
            target = os.path.join(self.build_lib, "adakd", "_source_commit.json")
            with open(target, "w") as handle:
                json.dump(commit, handle)


setup(cmdclass={"build_py": BuildPyWithCommit})
