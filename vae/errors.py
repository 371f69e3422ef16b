"""The one exception type the entry points turn into a one-line message (and a non-zero exit) for the user."""


class HarnessError(Exception):
    """Something the user can fix: bad config, missing data, unusable checkpoint, wrong launch. One line."""

    exit_code = 1

    def __str__(self) -> str:
        # Messages quote user input (keys, values, paths); a newline in that input must not break the line.
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")
