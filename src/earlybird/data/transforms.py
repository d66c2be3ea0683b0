"""Input transforms of the reference's training options, batched on the training device.

* ``--filter lowpass|highpass --sigma S``: a Gaussian in the frequency domain. Each image's centred
  spectrum is multiplied by exp(-d^2 / (2 S^2)) (d: distance in frequency bins from the centre) for
  a low-pass, or by one minus it for a high-pass.
* ``--sparsify-gt T``: every pixel whose value on the 0-1 scale is at or below T becomes 0.

Both act on pixel values (0-255) before normalization, on training and test images alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

FILTERS = ("none", "lowpass", "highpass")


@dataclass(frozen=True)
class InputTransform:
    filter: str = "none"
    sigma: float = 1.0
    sparsify_gt: float | None = None

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise ConfigError(f"--filter {self.filter} is not one of {', '.join(FILTERS)}")
        if self.filter != "none" and not self.sigma > 0:
            raise ConfigError(f"--sigma {self.sigma:g} must be positive: it is the Gaussian's width in frequency bins")
        if self.sparsify_gt is not None and not 0 <= self.sparsify_gt < 1:
            raise ConfigError(f"--sparsify-gt {self.sparsify_gt:g} must be in [0, 1): pixels are on a 0-1 scale")

    @property
    def active(self) -> bool:
        return self.filter != "none" or self.sparsify_gt is not None

    def gaussian(self, height: int, width: int, device) -> torch.Tensor:
        """The low-pass gain of every bin of a centred (fftshift-ed) spectrum."""
        fy = torch.arange(height, device=device, dtype=torch.float32) - height // 2
        fx = torch.arange(width, device=device, dtype=torch.float32) - width // 2
        d2 = fy[:, None] ** 2 + fx[None, :] ** 2
        return torch.exp(-d2 / (2 * self.sigma ** 2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float pixel values (0-255), N x C x H x W."""
        if self.sparsify_gt is not None:
            x = torch.where(x <= self.sparsify_gt * 255.0, torch.zeros_like(x), x)
        if self.filter != "none":
            gain = self.gaussian(x.shape[-2], x.shape[-1], x.device)
            if self.filter == "highpass":
                gain = 1 - gain
            spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * gain
            x = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
        return x
