"""Makes, imports, learns and reads channel masks."""
