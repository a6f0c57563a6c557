"""The `leank` command: thin typer commands over the library."""
