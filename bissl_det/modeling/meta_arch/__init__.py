from .bissl import BackbonePairs, BiSSL, build_pretext_model, pair_by_suffix

__all__ = ["BackbonePairs", "BiSSL", "build_pretext_model", "pair_by_suffix"]
