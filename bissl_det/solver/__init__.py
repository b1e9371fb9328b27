"""Optimisers and their parameter groups."""

from .lars import LARS, is_norm_module, lars_param_groups

__all__ = ["LARS", "is_norm_module", "lars_param_groups"]
