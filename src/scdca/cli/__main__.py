"""`python -m scdca.cli` runs the command line."""

from scdca.cli import main

main()
