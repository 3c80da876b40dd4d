"""Errors the engine knows how to report."""


class InputError(Exception):
    """Bad input (recipe, path, CLI argument): printed as one line `where: message`, exit code 2."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
