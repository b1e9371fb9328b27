from .bissl import BackbonePairs, BiSSL, pair_by_suffix

__all__ = ["BackbonePairs", "BiSSL", "pair_by_suffix"]
