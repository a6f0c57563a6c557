"""`python -m leank.cli` runs the `leank` command."""
from leank.cli.app import main


main()
