"""A small Lightning task on the suite's generated CIFAR files, shared by the single-process test and
the two-process DDP script (tests/test_lightning.py)."""
import json
import sys
import types
from pathlib import Path

# torchmetrics (under Lightning) imports torchvision, whose CUDA wheel on a CPU-only torch fails in
# two registration modules the suite does not need (see test_zoo_models)
for _module in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_module, types.ModuleType(_module))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from earlybird import ModelSpec, create_model  # noqa: E402
from earlybird.data import load_dataset  # noqa: E402


class Task(pl.LightningModule):
    def __init__(self, lr: float = 0.1, net: torch.nn.Module | None = None, optimizer: str = "sgd"):
        super().__init__()
        self.net = net if net is not None else create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32))
        self.lr, self.optimizer = lr, optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.net.parameters(), lr=self.lr)
        return torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def data(root, train: bool = True):
    d = load_dataset("cifar10", root, download=False)
    images, labels = (d.train_images, d.train_labels) if train else (d.test_images, d.test_labels)
    return TensorDataset(images.float() / 255 - 0.5, labels)


def accuracy(net, dataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return 100.0 * float((net.eval()(x).argmax(1) == y).float().mean())


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


if __name__ == "__main__":  # the DDP run: python lightning_task.py DATA_ROOT SAVE_DIR
    from earlybird.lightning import EarlyBirdCallback

    root, save = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)
    task = Task()
    callback = EarlyBirdCallback([0.5], example_inputs=torch.randn(2, 3, 32, 32), module="net", window=2,
                                 threshold=0.5, save_dir=save)
    run = trainer(max_epochs=12, strategy="ddp", devices=2, callbacks=[callback])
    run.fit(task, DataLoader(data(root), batch_size=16, shuffle=True))
    mask = torch.cat([m for m in callback.tickets[0.5].values()]).int().tolist()
    # a file per rank: two processes' long lines on one stdout can interleave
    Path(save).mkdir(parents=True, exist_ok=True)
    (Path(save) / f"rank-{run.global_rank}.json").write_text(json.dumps(
        {"epochs": run.current_epoch, "emerged": callback.detector.emerged[0.5], "mask": mask}))
