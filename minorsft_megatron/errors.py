"""The one base class of everything a user can cause and fix: bad input, a setting this machine cannot run, a
file in the way. Every command reports one as a single line (`error: ...`) and exits with status 2; anything
else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A problem with the user's input or environment; the message is one line naming the file, key or flag."""
