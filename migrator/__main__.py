"""`python -m migrator` runs the command line."""

from migrator.cli import main

main()
