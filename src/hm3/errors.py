"""The one exception type hm3 raises for bad input; the CLI turns it into one line and exit 2."""


class Hm3Error(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
