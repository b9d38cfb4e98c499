"""Llama-family language models: the decoder, generation, import, tokenizer."""
