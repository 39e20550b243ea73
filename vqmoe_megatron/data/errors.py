"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Bad data, a bad path or a mismatched setting; the message names it and says how to fix it."""
