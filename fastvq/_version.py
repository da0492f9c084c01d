"""fastvq's version: the one place it is written (pyproject.toml reads it; importing it imports nothing else)."""

__version__ = "0.1.0"
