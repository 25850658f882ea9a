"""The `photon` command line (typer), one module per command group: parsing only; every command calls the library.

`common` holds the apps and shared options; `train`, `deploy` and `bench` register their commands on import;
`main` runs the app. `photon.cli.app` and `photon.cli.main` are what the console script and tests use.
"""

from photon.cli.main import app, main

__all__ = ["app", "main"]
