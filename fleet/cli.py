"""`fleetctl`: the operator's tool. Fleet creation, the controller and rollouts come next."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fleetctl",
    help="Operate a Fleet: runes, devices, rollouts. (The controller arrives in the next release.)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the installed Fleet version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("fleet-tinyml"))


def main() -> None:
    app()
