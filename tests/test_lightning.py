"""earlybird.lightning.EarlyBirdCallback in a real lightning.Trainer: a few epochs on the generated data,
a ticket drawn, the run stopped, the ticket pruned and retrained in Lightning; and under DDP with two
CPU processes (gloo)."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

task_module = pytest.importorskip("lightning_task")  # stubs torchvision's registrations, then imports lightning
Task, accuracy, data, trainer = task_module.Task, task_module.accuracy, task_module.data, task_module.trainer
from torch.utils.data import DataLoader  # noqa: E402

from earlybird import apply_mask  # noqa: E402
from earlybird.lightning import EarlyBirdCallback  # noqa: E402


def test_a_ticket_in_lightning_stops_the_run_and_prunes_and_retrains(tmp_path, cifar10_root, monkeypatch):
    import earlybird.lightning as eb_lightning

    torch.manual_seed(0)
    task, x = Task(), torch.randn(2, 3, 32, 32)
    steps = []
    real = eb_lightning.add_bn_l1_grad
    monkeypatch.setattr(eb_lightning, "add_bn_l1_grad", lambda m, s: steps.append(s) or real(m, s))
    callback = EarlyBirdCallback([0.5], example_inputs=x, module="net", window=2, threshold=0.5,
                                 save_dir=str(tmp_path / "tickets"))
    run = trainer(max_epochs=12, callbacks=[callback])
    run.fit(task, DataLoader(data(cifar10_root), batch_size=16, shuffle=True))
    epoch = callback.detector.emerged[0.5]
    assert run.current_epoch == epoch < 12  # stopped at the ticket's epoch, not the schedule's end
    assert len(steps) == run.global_step and steps[0] == 1e-4  # L1 on every optimizer step
    saved = torch.load(tmp_path / "tickets" / f"EB-50-{epoch}.pth", weights_only=True)
    assert saved["epoch"] == epoch and set(saved["masks"]) == set(callback.tickets[0.5])
    small, plan = callback.prune(0.5, task)
    assert small.training == task.net.training  # in the mode the network was in
    with torch.no_grad():  # the pruned network computes what the masked one does
        want = apply_mask(task.net, plan.masks(task.net), plan.zeroed).eval()(x)
        assert torch.allclose(copy.deepcopy(small).eval()(x), want, atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in task.net.parameters())
    task.net = small  # the documented retrain: the small network in the same LightningModule
    bns = [m for m in small.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    modes = BNModes()
    trainer(max_epochs=3, callbacks=[modes]).fit(task, DataLoader(data(cifar10_root), batch_size=16, shuffle=True))
    assert modes.seen == {True}  # every BN normalized with batch statistics in every retrain step
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))  # and kept its running statistics
    assert 0 <= accuracy(task.net, data(cifar10_root, train=False)) <= 100


def test_every_n_steps_draws_inside_the_first_epoch_and_stops_at_that_step(tmp_path, cifar10_root):
    torch.manual_seed(0)
    task = Task(lr=0.001)  # a gentle fine-tune of spread-out BN scales: the smallest channels stay the smallest
    with torch.no_grad():
        for bn in (m for m in task.net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.num_features) + 0.05)
    callback = EarlyBirdCallback([0.5], example_inputs=torch.randn(2, 3, 32, 32), module="net", window=3,
                                 save_dir=str(tmp_path / "tickets"), every_n_steps=1)
    run = trainer(max_epochs=3, callbacks=[callback])
    run.fit(task, DataLoader(data(cifar10_root), batch_size=16, shuffle=True))  # 5 steps an epoch
    assert callback.detector.interval == pytest.approx(0.2) and callback.detector.bound == pytest.approx(0.02)
    assert callback.detector.emerged == {0.5: 0.6}  # the third draw fills the window
    assert run.global_step == 3  # stopped after that step, two before the first epoch's end
    saved = torch.load(tmp_path / "tickets" / "EB-50-0.6.pth", weights_only=True)
    assert saved["epoch"] == 0.6
    restored = EarlyBirdCallback([0.5], example_inputs=torch.randn(2, 3, 32, 32), module="net", window=3,
                                 every_n_steps=1)
    restored.load_state_dict(callback.state_dict())
    run = trainer(max_epochs=1, callbacks=[restored])
    run.fit(task, DataLoader(data(cifar10_root), batch_size=16))
    assert restored.detector.emerged == {0.5: 0.6}  # taken back once the interval was known
    with pytest.raises(ValueError, match="every 1 or more steps"):
        EarlyBirdCallback([0.5], every_n_steps=0)


class BNModes(task_module.pl.Callback):
    """The training flags of the BNs at every training step of a fit."""

    def __init__(self):
        self.seen = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen |= {m.training for m in pl_module.modules() if isinstance(m, torch.nn.BatchNorm2d)}


def test_ddp_on_two_cpu_processes_draws_one_ticket(tmp_path, cifar10_root):
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(here), str(here.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(here / "lightning_task.py"), str(cifar10_root), str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    written = [tmp_path / "t" / f"rank-{r}.json" for r in (0, 1)]
    assert all(p.exists() for p in written), run.stderr[-3000:]  # rank 1's failure does not set the exit code
    ranks = [json.loads(p.read_text()) for p in written]
    assert ranks[0] == ranks[1]  # the same epochs, ticket epoch and mask on both ranks
    files = list((tmp_path / "t").glob("EB-50-*.pth"))
    assert len(files) == 1 and not list((tmp_path / "t").glob(".*tmp"))  # written by rank 0 alone
