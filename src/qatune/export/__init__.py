"""The export stage: `export(config, runtime) -> ExportResult` (run.py) over the recipe in recipe.py;
GGUF writing in gguf.py."""
