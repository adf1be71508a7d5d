"""The model: our decoder, its KV cache, weight loading, tokenizers and single-process generation,
and (``shard``) one rank's share of a stage in a tensor-parallel group.

Entry point: ``hpipe.model.source.open_model``; see README.md for the API.
"""
