"""Errors the CLI reports without a traceback. No heavy imports: the query commands use this too."""


class RunFailed(RuntimeError):
    """A pipeline stopped on purpose (e.g. too many dead letters) and published nothing; exit status 1."""
