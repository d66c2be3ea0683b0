"""Training speed, kept apart from the method: the method's code runs the same without it.

What it holds: the speed settings timed on the model (memory format, autocast type; ``tuning``,
``speed``) and, on CPUs only, a fused batch norm compiled on first use (``batch_norm`` with
``batch_norm.cpp``), convolutions as im2col + GEMM where that beats oneDNN (``conv``) and an
allocator setting (``tuning.keep_freed_memory``). ``--cpu-kernels off`` leaves the CPU parts out
(plain PyTorch); on GPUs they never apply.

One entry point, applied in one place (the stages' ``prepare_training``)::

    model, speed = accel.prepare(model, input_shape, num_classes, batch_size, device, rt, reporter)
    ...  # train under torch.autocast(device.type, speed.amp_dtype) where it is not None
    accel.restore(model, speed)  # plain PyTorch modules again, the same parameters

``speed.state_dict(model)`` is the one checkpoint entry it owns ("speed"); a resumed stage passes
it back as ``prepare(..., resumed=...)``.
"""
from .batch_norm import FusedBatchNorm2d, fuse_batch_norm, unfuse
from .conv import GemmConv2d
from .speed import Speed, autocast_dtype, format_name, inference_speed, prepare, restore, training_speed
from .tuning import describe_gpu, gemm_convolutions, precision_name, use_gemm

__all__ = ["FusedBatchNorm2d", "GemmConv2d", "Speed", "autocast_dtype", "describe_gpu", "format_name",
           "fuse_batch_norm", "gemm_convolutions", "inference_speed", "precision_name", "prepare", "restore",
           "training_speed", "unfuse", "use_gemm"]
