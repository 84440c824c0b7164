"""The base of every error that means "this input cannot be used": a command prints it and exits with 2
(nnU-Net's and argparse's code for bad usage); anything else is a bug and keeps its traceback."""


class VerSemiInputError(ValueError):
    """Bad input (dataset, file, case, argument): the message names it and says what is wrong."""
