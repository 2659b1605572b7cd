"""hm3's exception for bad input (the CLI turns it into one line and exit 2) and its warning."""


class Hm3Error(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class Hm3Warning(UserWarning):
    """Something merged, but probably not as the user meant."""
