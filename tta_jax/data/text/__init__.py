"""Text for language models: gensim's real corpora and synthetic tasks."""
