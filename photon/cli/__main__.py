"""`python -m photon.cli`: the `photon` command."""

from photon.cli.main import main

main()
