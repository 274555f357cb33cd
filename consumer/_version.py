"""The package version, in a leaf module of its own so that any module can import it without
importing the package root (which exports the publisher); setuptools reads it too."""

__version__ = "0.1.0"
