"""The one exception type users see: `MmcError` carries a one-line message for the CLI.

Anything raised as MmcError is bad input or an unmet precondition and is printed as
`mmc: error: <message>` with a non-zero exit; any other exception is a bug in mmc.
"""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (cut at `limit`), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


class MmcError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do."""


class PassCheckError(MmcError):
    """A pass changed what the graph computes beyond tolerance (raised by --verify-each)."""
