"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    exit_code = 2
    label = "error"  # the CLI prints "<label>: <message>"; None prints the message alone
