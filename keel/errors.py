"""User-facing errors: one line that says what is wrong and how to fix it."""


class KeelError(ValueError):
    """A problem with the user's input (model dir, recipe, dataset, flags). The CLI prints the
    message on one line and exits with status 2; the library raises it before writing anything."""
