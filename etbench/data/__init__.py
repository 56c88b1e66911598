"""Dataset loaders: image datasets (``images``) and graph datasets, plus the shared error type."""


class DatasetError(ValueError):
    """A dataset is missing, corrupt or in an unexpected layout; the message names the path and the fix."""
