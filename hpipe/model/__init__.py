"""The model: our decoder, its KV cache, weight loading, tokenizers and single-process generation.

Entry point: ``hpipe.model.source.open_model``; see README.md for the API.
"""
