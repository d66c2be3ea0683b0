"""Low-precision training (SWALP): number formats, where they sit, and stochastic weight averaging."""
from .formats import BlockFloat, FixedPoint, SmallFloat, quantize
from .training import LowPrecision, LowPrecisionOptimizer, Precision, SWA, quantize_layer_outputs

__all__ = ["BlockFloat", "FixedPoint", "LowPrecision", "LowPrecisionOptimizer", "Precision", "SWA", "SmallFloat", "quantize",
           "quantize_layer_outputs"]
