"""The GGUF file: a bounds-checked reader (`reader`) and the `leank.*` metadata schema (`schema`)."""
