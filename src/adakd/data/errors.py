"""One error type for every dataset problem, and the rule that finds a dataset's folder."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adakd.download import cache_root


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the file, what was expected and how to give the path."""


@dataclass(frozen=True)
class Source:
    """Where one on-disk dataset is looked for and what its folder must hold (used to word every error)."""

    name: str  # the name in DATASETS
    env: str  # the dataset's own environment variable
    expected: str  # the layout the folder must have, with where it is distributed
    parent_subdir: str = ""  # where the dataset sits below ADAKD_DATA ("" = ADAKD_DATA itself)

    def how_to_give(self) -> str:
        """The sentence telling a user the ways to point adakd at the data."""
        under = f"ADAKD_DATA/{self.parent_subdir}" if self.parent_subdir else "ADAKD_DATA itself"
        return (f"give the folder with the config key data.root (or root= in load_dataset), or set the environment "
                f"variable {self.env}, or ADAKD_DATA to a folder that holds all datasets ({self.name} is looked "
                f"for in {under}); without any of them adakd uses {default_data_root() / self.parent_subdir}")

    def error(self, problem: str, path: str | os.PathLike | None) -> DatasetError:
        """A DatasetError naming the problem, the path tried, the expected layout and how to give the path."""
        tried = f" (tried {path})" if path is not None else ""
        return DatasetError(f"{self.name}: {problem}{tried}; expected {self.expected}; {self.how_to_give()}")

    def resolve_root(self, root: str | os.PathLike | None) -> Path:
        """The folder to read: explicit root, else $<env>, else $ADAKD_DATA[/parent_subdir], else the per-user
        default_data_root()[/parent_subdir], where downloads go when nothing else is set."""
        if root is not None:
            return Path(root).expanduser()
        if os.environ.get(self.env):
            return Path(os.environ[self.env]).expanduser()
        if os.environ.get("ADAKD_DATA"):
            return Path(os.environ["ADAKD_DATA"]).expanduser() / self.parent_subdir
        return default_data_root() / self.parent_subdir


def default_data_root() -> Path:
    """Where datasets live when neither data.root nor an ADAKD_DATA variable is set: <adakd cache>/data, i.e.
    $ADAKD_CACHE/data, else $XDG_CACHE_HOME/adakd/data, else ~/.cache/adakd/data."""
    return cache_root() / "data"
