"""User-facing errors.

A ZsdError carries one sentence that tells the user what is wrong and what to pass instead;
the CLI prints it without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class ZsdError(Exception):
    pass
