"""The exceptions gapcam raises, one tree.

    GapcamError                 base class; catch this to catch everything gapcam raises on purpose
    ├── ImageError              an input image is missing, unreadable, corrupt or too large
    ├── VideoError              an input video cannot be read: no PyAV, no video stream, corrupt
    ├── ModelError              unknown model, unsupported architecture, weights that cannot be had
    │   └── UnsupportedModelError   the network is not GAP + one linear layer, so it has no exact CAM
    ├── ClassSelectionError     a requested class index or name does not exist in the model
    ├── DatasetError            a dataset cannot be used: no classes, empty or mismatched classes,
    │                           malformed annotations (each listed with file:line)
    ├── TrainingError           training cannot start or go on: bad settings, a run folder in the way
    └── OutputError             an output would overwrite an input or an existing file

Every message names the file or argument, shows the value received and says how to fix it.
Front ends print ``str(error)`` as one line and exit non-zero; they never show a traceback. An
error that gathers several problems (``DatasetError``: every malformed annotation) keeps them in
``details``, one printable line each, listed by front ends under the message; ``str(error)``
holds them too, one a line, before the message.
"""

from __future__ import annotations


class GapcamError(Exception):
    """Base class of every error gapcam raises on purpose."""

    def __init__(self, message: str = "", *, details: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = tuple(details)

    def __str__(self) -> str:
        return "\n".join([*self.details, self.message])


class ImageError(GapcamError):
    """An input image is missing, unreadable, corrupt, of an unsupported kind or too large."""


class VideoError(GapcamError):
    """An input video cannot be read: PyAV missing, not a video, no video stream or no frames,
    corrupt or truncated, frames over the pixel limit."""


class ModelError(GapcamError):
    """A model cannot be built: unknown name, weights not available, bad weights file."""


class UnsupportedModelError(ModelError):
    """The architecture does not end in global average pooling + one linear layer."""


class ClassSelectionError(GapcamError):
    """A requested class (index or name) is not one of the model's classes."""


class DatasetError(GapcamError):
    """A dataset (image folder or annotations) cannot be used as it is."""


class TrainingError(GapcamError):
    """Training cannot start or continue: conflicting settings, an existing run, no progress."""


class OutputError(GapcamError):
    """Writing an output would overwrite an input or an existing file, or failed."""
