"""Every path the studio touches, confined to its workspace folder.

A path from a browser is taken relative to the workspace; it is refused when it is absolute outside
the workspace, names `..`, or resolves (symlinks followed) to a place outside it. The jobs run with
the workspace as their working folder, so a path that passed here means the same file to them.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from qatune.errors import QatuneError


class PathRefused(QatuneError):
    """A path that would leave the workspace."""


class Workspace:
    """The folder the studio works in: data files, prepared data, runs, exports and the job records."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, relative: str) -> Path:
        """The absolute path of `relative`, or PathRefused when it would leave the workspace."""
        text = str(relative).strip().replace("\\", "/")
        if not text:
            raise PathRefused("an empty path", hint="give a path inside the workspace, e.g. data/qa.jsonl")
        given = PurePosixPath(text)
        if ".." in given.parts:
            raise PathRefused(f"{text!r} names '..'", hint="give a path inside the workspace, without '..'")
        path = Path(text) if given.is_absolute() else self.root / given
        resolved = path.resolve()  # symlinks followed: a link inside that points outside is refused here
        if not resolved.is_relative_to(self.root):
            raise PathRefused(f"{text!r} is outside the workspace {self.root}",
                              hint="copy the file into the workspace, or start the studio with --workspace above it")
        return resolved

    def relative(self, path: Path) -> str:
        """`path` as the workspace-relative text the pages and the commands show."""
        return Path(path).resolve().relative_to(self.root).as_posix() or "."

    @property
    def studio_dir(self) -> Path:
        """Where the studio keeps its own records (jobs and their logs)."""
        return self.root / ".studio"
