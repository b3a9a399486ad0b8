"""ctseg's own error types, so the CLI and tests can tell a refusal of bad input from a bug."""


class CTSegError(Exception):
    """Base of every error ctseg raises on purpose (bad input, bad config, bad model)."""


class DicomError(CTSegError):
    """A DICOM file or series that cannot be turned into a trustworthy volume."""


class MaskError(CTSegError):
    """A label map that is missing, unreadable, or does not match its volume."""


class ConfigError(CTSegError):
    """A configuration value that is missing, mistyped or inconsistent."""


class ModelError(CTSegError):
    """A model (run folder, checkpoint, bundle) that cannot be loaded or does not fit the input."""
