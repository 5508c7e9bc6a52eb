"""The one exception a command raises for bad input."""


class CLIError(Exception):
    """Bad input to a command: printed as one line, exit code 2."""
