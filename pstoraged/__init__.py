"""PStorage: a data-reducing, log-structured block storage daemon."""

__version__ = "0.1.0"
