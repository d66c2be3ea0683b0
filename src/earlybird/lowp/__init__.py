"""Low-precision training (SWALP): number formats, where they sit, and stochastic weight averaging."""
from .formats import BlockFloat, quantize
from .training import LowPrecision, LowPrecisionOptimizer, Precision, SWA, quantize_layer_outputs

__all__ = ["BlockFloat", "LowPrecision", "LowPrecisionOptimizer", "Precision", "SWA", "quantize",
           "quantize_layer_outputs"]
