"""The library's own error types: what the runner reports as one failed case, naming the file and the cause."""


class InputError(Exception):
    """A problem with one input, model or output file; the message names the file and the cause."""
