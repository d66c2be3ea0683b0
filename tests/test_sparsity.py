import torch
from torch import nn

from earlybird import add_bn_l1_grad
from earlybird.train import train_epoch


def test_l1_subgradient_is_added_to_bn_scales_only():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.2, 0.0, 1.0]))
    model(torch.randn(2, 1, 5, 5)).sum().backward()
    before_bn, before_conv = model[1].weight.grad.clone(), model[0].weight.grad.clone()
    before_shift = model[1].bias.grad.clone()
    add_bn_l1_grad(model, 1e-2)
    assert torch.allclose(model[1].weight.grad - before_bn, torch.tensor([1e-2, -1e-2, 0.0, 1e-2]))
    assert torch.equal(model[0].weight.grad, before_conv)
    assert torch.equal(model[1].bias.grad, before_shift)


class OneBatch:
    def __init__(self, x, y):
        self.batch = (x, y)

    def __iter__(self):
        yield self.batch

    def __len__(self):
        return 1


def _step(scaler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 9, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: look at the gradients only
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))
    train_epoch(model, OneBatch(x, y), opt, l1=1e-3, scaler=scaler)
    return model[1].weight.grad


def test_l1_under_loss_scaling_is_applied_after_unscaling():
    plain = _step(None)
    scaled = _step(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    # had the L1 term been added before unscaling it would be divided by 4096
    assert torch.allclose(plain, scaled, rtol=1e-4, atol=1e-7)
