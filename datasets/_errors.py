"""Data errors, in a module without heavy imports so the CLI can catch them cheaply."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with one file or folder of a dataset; the message starts with the path."""

    def __init__(self, path: object, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset root (or a required file in it) is missing; says where we looked and how to get the data."""
