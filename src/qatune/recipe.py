"""The shape every stage shares: plan -> setup -> run.

- `plan(config, runtime, ...) -> Plan` checks everything and decides (paths, resume point, what
  would be replaced) without writing, deleting or loading weights: a config mistake is reported
  before any cost, and the plan says what the run will touch.
- `setup(plan) -> Components` loads (tokenizers, models, data).
- `run(plan, components) -> Result` does the work and returns a typed result.

A stage's recipe is its module (`qatune.export.recipe`, ...): three functions, no base class.
The CLI, the tests and the studio call a stage's one-screen entry function, which is `execute`.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

PlanT_contra = TypeVar("PlanT_contra", contravariant=True)
ResultT_co = TypeVar("ResultT_co", covariant=True)
PlanT = TypeVar("PlanT")
ResultT = TypeVar("ResultT")


class Recipe(Protocol[PlanT_contra, ResultT_co]):
    def setup(self, plan: PlanT_contra) -> Any: ...

    def run(self, plan: PlanT_contra, components: Any) -> ResultT_co: ...


def execute(recipe: Recipe[PlanT, ResultT], plan: PlanT) -> ResultT:
    """Load what the plan needs, then run it."""
    return recipe.run(plan, recipe.setup(plan))
