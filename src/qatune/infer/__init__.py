"""Generation shared by training previews, evaluation, chat and serving."""
