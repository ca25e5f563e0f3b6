"""The one place resd's version is written: pyproject.toml reads it (hatch's
version source) and the code imports it, so no command pays ~30 ms for
importlib.metadata to look it up."""

__version__ = "0.1.0"
