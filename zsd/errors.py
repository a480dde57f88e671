"""User-facing errors.

A ZsdError carries one sentence that tells the user what is wrong and what to pass instead;
the CLI prints it without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class ZsdError(Exception):
    pass


def check_at_least(flag: str, value, minimum, *, exclusive: bool = False) -> None:
    """The library's twin of the CLI's click ranges, so a Python caller gets the same one-line error.

    Written as `not value >= minimum` so that NaN fails too. None means "use the default" and passes.
    """
    if value is None:
        return
    ok = value > minimum if exclusive else value >= minimum
    if not ok:
        raise ZsdError(f"{flag} {value}: must be {'>' if exclusive else '>='} {minimum}")
