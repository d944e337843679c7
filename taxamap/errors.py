"""The one exception family users see.

Anything raised as :class:`TaxamapError` is a problem with the user's input or environment; the CLI
prints its message as one line on stderr and exits with code 2. Its message says how to fix it.
"""


class TaxamapError(Exception):
    """Bad input, missing data or missing weights: a one-line, actionable message."""


class ModelFilesMissing(TaxamapError):
    """Weights or configs for a model repo could not be found (offline, or not downloaded)."""
