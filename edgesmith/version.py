"""The package version, importable from any layer (the root package sits at the top)."""

__version__ = "0.1.0"
