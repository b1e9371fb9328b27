"""The config: defaults with the rule beside each key (:mod:`.defaults`), the checks that refuse a
bad value naming the key and the file that set it (:mod:`.checks`), and flat views for comparing
runs (:mod:`.values`)."""

from .defaults import add_bissl_config

__all__ = ["add_bissl_config"]
