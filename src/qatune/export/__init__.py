"""The export stage: `export(config) -> ExportResult` (see run.py); GGUF writing in gguf.py."""
