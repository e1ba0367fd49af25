"""Errors a user of `parcae prep` can act on; the CLI prints the message and exits with ``exit_code``."""


class PrepError(Exception):
    exit_code = 1
