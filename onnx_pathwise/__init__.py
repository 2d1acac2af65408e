"""onnx_pathwise: exact explanations of piecewise-linear (ReLU) ONNX models.

See :class:`Explainer` for the Python API and ``onnx-pathwise --help`` for the CLI.
"""

from .errors import (
    DeviceError,
    InputError,
    ModelError,
    OutputError,
    PathwiseError,
    UnsupportedModelError,
)
from .explainer import Attribution, Decomposition, Explainer, RadiusResult, UnwrapResult
from .pathwise import Explanation, PathLayer

__all__ = [
    "Attribution",
    "Decomposition",
    "DeviceError",
    "Explainer",
    "Explanation",
    "InputError",
    "ModelError",
    "OutputError",
    "PathLayer",
    "PathwiseError",
    "RadiusResult",
    "UnsupportedModelError",
    "UnwrapResult",
]
__version__ = "0.1.0"
