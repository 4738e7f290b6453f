"""The data stage: files in any common Q&A format -> cleaned, tokenized, reported training samples."""
