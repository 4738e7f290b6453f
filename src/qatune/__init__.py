"""qatune: turn an open LLaMA-family model and your own Q&A data into a domain assistant."""

__version__ = "0.1.0"
