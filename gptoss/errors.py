"""The error hierarchy: every stage raises a subclass of ToolchainError for bad input.

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class ToolchainError(Exception):
    """Bad input or environment, explained in the message (what is wrong, what to do)."""
