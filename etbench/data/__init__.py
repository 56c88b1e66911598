"""Dataset loaders: image datasets (``images``) and graph datasets, plus the shared error type."""

from etbench.errors import EtbenchError


class DatasetError(EtbenchError, ValueError):
    """A dataset is missing, corrupt or in an unexpected layout; the message names the path and the fix."""
