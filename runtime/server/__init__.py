"""`leank serve`: an OpenAI-compatible HTTP server over the library (`api`), slots decoded together (`slots`)."""
