"""What the studio's routers share, one object per app: the workspace, its jobs, the token, the upload limit.

A router reaches it as a parameter typed `Studio` (a FastAPI dependency on `request.app.state.studio`),
so two apps in one process (the tests start several) share nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, Field

from qatune.models import DEFAULT_MODEL, embedded_models
from qatune.studio import form
from qatune.studio.jobs import JobRunner
from qatune.studio.paths import PathRefused, Workspace
from qatune.text_input import Name, Text

# Keys a page may add to a job's command besides its own flags: settings, never a path.
PAGE_SETTINGS = {"eval": ("eval.decoding.", "eval.max_samples", "eval.batch_size", "eval.side_by_side", "model.dtype"),
                 "export": ("export.check_max_new_tokens", "export.dtype", "model.dtype"),
                 "serve": ("serve.decoding.", "model.dtype")}


class ModelJob(BaseModel):
    """A job on a run's model (evaluate, export, chat): the base model, the run, and the page's choices."""

    base: Name = DEFAULT_MODEL  # an embedded model's name, or a model folder in the workspace
    run: Name
    data: Name | None = None
    gguf: Name | None = None
    quantize: Name | None = None
    force: bool = False
    extra: list[Text] = Field(default_factory=list)


@dataclass
class StudioState:
    workspace: Workspace
    runner: JobRunner
    token: str | None  # required on every request, and by the chat servers the studio starts
    max_upload_bytes: int

    def path(self, relative: str) -> str:
        """A path from a page as the workspace-relative text a command takes (refused when it leaves the workspace)."""
        return self.workspace.relative(self.workspace.resolve(relative))

    def run_folder(self, run: str) -> str:
        if not form.RUN_NAME.fullmatch(run):
            raise PathRefused(f"run name {run!r}")
        return self.path(f"runs/{run}")

    def model(self, model: str) -> str:
        """An embedded model's name as it is, or a model folder in the workspace."""
        return model if model in embedded_models() else self.path(model)

    def start(self, kind: str, argv: list[str], output: str | None = None, **options: Any) -> dict[str, Any]:
        """Start `qatune ARGV` as a job of `kind` writing `output`; the job as the pages read it."""
        return self.runner.start(kind, argv, output, **options).as_dict()


def page_settings(kind: str, extra: list[str]) -> list[str]:
    """The `key=value` settings a page adds to a `kind` job, refused unless each is one it may add."""
    refused = [e for e in extra if "=" not in e or not e.split("=", 1)[0].startswith(PAGE_SETTINGS[kind])]
    if refused:
        raise PathRefused(f"not a {kind} setting this page may add: {', '.join(refused)}",
                          hint=f"keys starting with {', '.join(PAGE_SETTINGS[kind])}")
    return list(extra)


def _state_of(request: Request) -> StudioState:
    return request.app.state.studio


Studio = Annotated[StudioState, Depends(_state_of)]
