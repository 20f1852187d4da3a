"""The README's main command until `fleetctl demo` exists: build and run the example runes.

Generates the example models and sensor data, builds both example Runefiles into bundles with the
real `rune build` code, then runs each in the sandbox and prints its outputs. Exits non-zero if
any step fails.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.sandbox.errors import SandboxError
from agent.sandbox.inputs import InputFiles, InputSources
from agent.sandbox.models import inspect_model
from agent.sandbox.runner import load_rune
from examples.models import write_all
from ota.rune.build import build_bundle
from ota.rune.runefile import RunefileError

HERE = Path(__file__).resolve().parent


def main() -> int:
    console = Console()
    write_all(HERE)
    table = Table(title="Fleet example runes, built and run in the WebAssembly sandbox")
    for column in ("rune", "bundle", "inference", "outputs"):
        table.add_column(column)
    runs = (
        ("gesture", InputFiles(accel=HERE / "gesture" / "gesture.csv"), 4),
        ("sine", InputFiles(seed=42), 3),
    )
    with tempfile.TemporaryDirectory() as scratch:
        for name, files, count in runs:
            try:
                result = build_bundle(HERE / name / "Runefile.yml", inspect_model=inspect_model)
                path = Path(scratch) / f"{name}.runebundle"
                path.write_bytes(result.data)
                rune = load_rune(path.read_bytes(), sources=InputSources(files))
                for index in range(count):
                    outputs = [record.value for record in rune.call()]
                    summary = "; ".join(
                        ", ".join(_short(v) for v in item["elements"])
                        for value in outputs
                        for item in (value if isinstance(value, list) else [value])
                    )
                    table.add_row(
                        name if index == 0 else "",
                        f"{len(result.data)} B" if index == 0 else "",
                        str(index + 1),
                        summary,
                    )
            except (RunefileError, SandboxError) as exc:
                console.print(f"[bold red]error:[/] {name}: {exc}")
                return 1
    console.print(table)
    console.print(
        "Next: [bold]rune build[/], [bold]rune run[/] and [bold]rune inspect[/] (docs/runes.md)."
    )
    return 0


def _short(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
