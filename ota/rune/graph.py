"""The pipeline graph of a Runefile: where each input comes from, in what order stages run.

Rules:
- Every input names a stage of the pipeline, and `name.N` an output N that the stage declares.
- The graph has no cycles (a stage cannot, through any path, feed itself).
- Stages run in a topological order that keeps the Runefile's order where the graph allows, so
  the same Runefile always gives the same order.
- A stage's input types are its sources' declared output types; `check_types` hands them to a
  per-stage checker (built-in block rules, a model's signature) and collects what it says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ota.rune.runefile import Problem, Runefile, RunefileError, Stage
from ota.rune.tensors import TensorType

StageChecker = Callable[[Stage, list[TensorType]], list[str]]


def execution_order(runefile: Runefile) -> list[str]:
    """The order to run stages in; raises `RunefileError` for dangling inputs or cycles."""
    stages = runefile.stages
    problems: list[Problem] = []
    for stage in stages.values():
        for ref in stage.inputs:
            source = stages.get(ref.stage)
            if source is None:
                problems.append(
                    Problem(
                        f"stage {stage.name}",
                        f"input {ref} names no stage; stages are {', '.join(stages)}",
                    )
                )
            elif ref.index >= len(source.outputs):
                problems.append(
                    Problem(
                        f"stage {stage.name}",
                        f"input {ref} asks for output {ref.index} of {ref.stage}, which declares "
                        f"{len(source.outputs)} output(s)",
                    )
                )
            elif ref.stage == stage.name:
                problems.append(Problem(f"stage {stage.name}", "cannot take its own output"))
    if problems:
        raise RunefileError(problems)

    pending = {name: {ref.stage for ref in stage.inputs} for name, stage in stages.items()}
    order: list[str] = []
    while pending:
        ready = [name for name, deps in pending.items() if not deps]
        if not ready:
            cycle = ", ".join(sorted(pending))
            raise RunefileError(
                [
                    Problem(
                        "pipeline",
                        f"stages {cycle} form a cycle; every stage "
                        "must only read stages that do not depend on it",
                    )
                ]
            )
        name = ready[0]
        order.append(name)
        del pending[name]
        for deps in pending.values():
            deps.discard(name)
    return order


def input_types(runefile: Runefile, stage: Stage) -> list[TensorType]:
    return [runefile.stages[ref.stage].outputs[ref.index] for ref in stage.inputs]


def check_types(runefile: Runefile, order: list[str], checkers: Mapping[str, StageChecker]) -> None:
    """Run each stage's checker on its input types; raise `RunefileError` with all findings."""
    problems: list[Problem] = []
    for name in order:
        checker = checkers.get(name)
        if checker is None:
            continue
        stage = runefile.stages[name]
        for message in checker(stage, input_types(runefile, stage)):
            problems.append(Problem(f"stage {name}", message))
    if problems:
        raise RunefileError(problems)
