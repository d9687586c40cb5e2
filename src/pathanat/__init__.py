"""pathanat: pathology-anatomy disentanglement in brain MRI with structured HVAE priors."""

from pathanat.errors import PathanatError

__version__ = "0.1.0"
__all__ = ["PathanatError", "__version__"]
