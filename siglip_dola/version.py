"""The package's version, written here only: pyproject.toml reads it (setuptools dynamic version), `siglip_dola`
exports it as ``__version__`` and `siglip-dola --version` prints it."""
__version__ = "0.1.0"
