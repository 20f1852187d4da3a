#!/usr/bin/env python3
"""The README's two commands, on a fresh machine with only Python 3.11+.

`python3 dev.py demo` runs the main job and `python3 dev.py test` runs the whole suite. Both first
make (or refresh) a virtualenv in `.venv` with the project installed in editable mode with its
`dev` extra; the install is skipped while `pyproject.toml` is unchanged since the last one.
Extra arguments after `test` go to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".fleet-install-stamp"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"Fleet needs Python 3.11 or newer; this is {sys.version.split()[0]}.")
    if not (BIN / "python").exists():
        print(f"creating virtualenv in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    print(
        "installing Fleet and its test tools into .venv (first run takes a few minutes)", flush=True
    )
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def run(args: list[str]) -> int:
    return subprocess.run(args, cwd=ROOT).returncode


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in {"demo", "test"}:
        print("usage: python3 dev.py demo | test [pytest args...]", file=sys.stderr)
        return 2
    ensure_venv()
    python = str(BIN / "python")
    if command == "test":
        return run([python, "-m", "pytest", *sys.argv[2:]])
    return run([str(BIN / "fleetctl"), "demo", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
