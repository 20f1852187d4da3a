"""`fleet-agent`: the device daemon. Enrollment, updates and the command channel come next."""

from __future__ import annotations

import typer

from agent.sandbox.engine import engine

app = typer.Typer(
    name="fleet-agent",
    help="The Fleet device agent: verifies and runs signed runes in a WebAssembly sandbox.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def doctor() -> None:
    """Check that this device can run runes: the sandbox starts and the model runtimes present."""
    from agent.sandbox.models import EXTRAS, runtime_available

    engine()
    typer.echo("sandbox: wasmtime ready")
    for mimetype, (module, extra) in EXTRAS.items():
        state = (
            "installed"
            if runtime_available(mimetype)
            else f"missing (pip install 'fleet-tinyml[{extra}]')"
        )
        typer.echo(f"{mimetype}: {module} {state}")


def main() -> None:
    app()
