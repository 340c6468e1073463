"""User-facing errors: one line that says what is wrong and how to fix it."""


class KeelError(ValueError):
    """A problem with the user's input (model dir, recipe, dataset, settings). The CLI prints the
    message on one line and exits with status 2; the library raises it before writing anything.

    `field` names the config field (or argument) at fault, never a command-line flag: the library
    does not know how it was called. The CLI adds the flag that sets that field, where its
    command has one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
