"""`python -m gsmkit` runs the CLI."""

from gsmkit.cli import main

main()
