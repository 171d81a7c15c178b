"""The package's exceptions: one root whose subclasses carry a message that says how to fix the problem."""


class PolykvError(Exception):
    """Root of every error a user can cause; the CLI prints its message on one line and exits 2."""


class ModelError(PolykvError):
    """A model could not be found, read or loaded."""


class DataError(PolykvError):
    """A data file is missing, malformed or lacks required fields."""


class ConfigError(PolykvError):
    """An option has a value outside its accepted range."""


class ProfileError(PolykvError):
    """A calibration profile is missing, corrupt or from an incompatible version."""


class MissingPackageError(PolykvError):
    """An optional package is needed; the message gives the pip command."""


class PlanError(PolykvError):
    """A plan file is malformed, inconsistent, or does not match the model; lists every problem found."""


class SolverError(PolykvError):
    """The optimizer could not solve the problem (infeasible budget, missing solver, bad storage URL)."""


class ExportError(PolykvError):
    """A plan holds choices the target engine cannot express; the message names the layers and KV heads."""


class OutputError(PolykvError):
    """An output path cannot be written (a folder, read-only or immutable, under a file)."""
