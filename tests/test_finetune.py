"""Fine-tuning from pretrained weights: masks drawn inside an epoch (--eb-interval), a ticket found
and saved there, the search stopped at that step, and the retrain rewound to the pretrained weights
(--rewind pretrained)."""
import json

import pytest
import torch

import earlybird
from earlybird import ModelSpec, create_model
from earlybird.config import RetrainConfig
from earlybird.stages.retrain import _network
from earlybird.train import load_checkpoint
from test_cli import TINY, assert_one_line_error, cli

FAST = ["--amp", "off", "--channels-last", "off"]


def pretrained(path, seed=0):
    """Weights of TINY's network as a pretrained file: spread-out BN scales, so that a gentle
    fine-tune keeps the same channels smallest."""
    torch.manual_seed(seed)
    model = create_model(ModelSpec("vgg", 11, 0.0625, 3, 100, 32))  # 100 classes: cifar10 gets a new classifier
    with torch.no_grad():
        for _, bn in earlybird.prunable_bns(model):
            bn.weight.copy_(torch.rand(bn.num_features) + 0.05)
    torch.save(model.state_dict(), path)
    return model


def search(capsys, tmp_path, cifar10_root, *extra):
    # 80 images in batches of 16: 5 steps an epoch, masks drawn after every step
    return cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY, *FAST,
               "--weights", tmp_path / "pretrained.pth", "--lr", "0.001", "--epochs", "3", "--eb-interval", "1",
               "--eb-window", "3", "--ratios", "0.5", *extra)


def test_a_fine_tune_draws_its_ticket_inside_the_first_epoch_saves_it_and_stops_there(capsys, tmp_path,
                                                                                       cifar10_root):
    pretrained(tmp_path / "pretrained.pth")
    code, out, err = search(capsys, tmp_path, cifar10_root, "--save", tmp_path / "s")
    assert code == 0, err
    assert "masks drawn every 1 of the epoch's 5 steps, within 0.02 of each other (--eb-threshold 0.1 per epoch)" in out
    assert "search epoch 0.2/3  step 1  | max dist d0.5=-" in out and "note: at this interval" not in out
    # the window of 3 draws is full at step 3: the masks did not move, so the ticket is there
    assert "-> EB ticket p=0.5 at epoch 0.6 (step 3)" in out and "search epoch 0.6/3  lr 0.001" in out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["tickets"]["0.5"] == {"epoch": 0.6, "step": 3, "path": "EB-50-0.6.pth", "test_acc": None}
    assert summary["epochs_trained"] == 0.6 and summary["steps_trained"] == 3 and summary["stopped_early"]
    assert summary["interval_steps"] == 1 and summary["interval_epochs"] == 0.2
    assert summary["start"] == str(tmp_path / "pretrained.pth")
    ticket = load_checkpoint(tmp_path / "s" / "EB-50-0.6.pth")
    assert ticket["epoch"] == 0.6 and ticket["step"] == 3
    last = load_checkpoint(tmp_path / "s" / "checkpoint.pth")  # saved where the search stopped
    assert (last["epoch"], last["batch"]) == (0, 3) and last["positions"] == [0, 0.2, 0.4, 0.6]
    assert torch.equal(last["detector"]["tickets"]["0.5"], ticket["mask"])
    metrics = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    # a line per draw, then the evaluation where the search stopped
    assert [(m["epoch"], m.get("step")) for m in metrics] == [(0.2, 1), (0.4, 2), (0.6, 3), (0.6, None)]
    assert "distances" in metrics[0] and "test_acc" not in metrics[0] and "test_acc" in metrics[-1]
    code, out, err = cli(capsys, "report", tmp_path / "s")
    assert code == 0, err
    assert "| 0.5 | 0.6 | 20% |" in (tmp_path / "s" / "report" / "report.md").read_text()


def test_the_retrain_rewinds_to_the_pretrained_weights_pruned_to_the_ticket(capsys, tmp_path, cifar10_root):
    source = pretrained(tmp_path / "pretrained.pth")
    code, out, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY, *FAST,
                         "--weights", tmp_path / "pretrained.pth", "--lr", "0.001", "--epochs", "2", "--eb-interval",
                         "0.2", "--eb-window", "3", "--ratios", "0.5", "--rewind", "pretrained", "--save", tmp_path / "r")
    assert code == 0, err
    assert f"from the pretrained weights {tmp_path / 'pretrained.pth'}, epochs 1..2" in out
    assert "the retrain started again from these weights, pruned to the ticket (--rewind pretrained)" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    row = summary["ratios"][0]
    assert row["eb_epoch"] == 0.6 and row["rewind"] == "pretrained" and row["retrain_epochs"] == 2
    assert summary["start"] == str(tmp_path / "pretrained.pth")
    # the network the retrain starts from: the pretrained one with the ticket's channels, exactly
    pruned = tmp_path / "r" / "pruned-50" / "pruned.pth"
    ckpt = load_checkpoint(pruned)
    model, _, plan = _network(ckpt, RetrainConfig(model=str(pruned), rewind="pretrained"), None)
    dense = create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32))
    earlybird.load_pretrained(dense, source.state_dict())  # its classifier is left new, as the retrain's is
    masked = earlybird.apply_mask(dense, plan.masks(dense), plan.zeroed).eval()
    bns = [name for name, _ in earlybird.prunable_bns(dense)]
    with torch.no_grad():  # the features the classifier reads: the kept channels of the last BN
        for x in (torch.randn(16, 3, 32, 32), torch.rand(16, 3, 32, 32) * 4 - 1):
            torch.testing.assert_close(model.eval().features(x), masked.features(x)[:, plan.keep[bns[-1]]],
                                       rtol=1e-5, atol=1e-5)
    bn = next(name for name in bns if name in plan.keep)  # the first BN that lost channels, after its conv
    conv = f"features.{int(bn.split('.')[1]) - 1}.weight"
    ours, ticket = model.state_dict()[conv], ckpt["state_dict"][conv]
    assert ours.shape == ticket.shape and not torch.equal(ours, ticket)  # not the ticket's fine-tuned weights
    assert torch.equal(ours, source.state_dict()[conv][plan.keep[bn]])


def test_rewinding_without_pretrained_weights_is_one_line(capsys, tmp_path, cifar10_root):
    pretrained(tmp_path / "pretrained.pth")
    code, _, err = search(capsys, tmp_path, cifar10_root, "--save", tmp_path / "s")
    assert code == 0, err
    code, _, err = cli(capsys, "prune", "--model", tmp_path / "s" / "EB-50-0.6.pth", "--save", tmp_path / "p",
                       "--data", cifar10_root, "--no-download")
    assert code == 0, err
    retrain = ["retrain", "--model", tmp_path / "p" / "pruned.pth", "--data", cifar10_root, "--no-download", *FAST,
               "--epochs", "1"]
    code, _, err = cli(capsys, *retrain, "--rewind", "pretrained", "--reinit")
    assert_one_line_error(code, err, "--rewind pretrained and --reinit both choose")
    (tmp_path / "pretrained.pth").rename(tmp_path / "moved.pth")
    code, _, err = cli(capsys, *retrain, "--rewind", "pretrained")
    assert_one_line_error(code, err, f"the search started from {tmp_path / 'pretrained.pth'}, which is no longer there")
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY, *FAST,
                       "--epochs", "2", "--ratios", "0.5", "--full", "--save", tmp_path / "scratch")
    assert code == 0, err
    code, _, err = cli(capsys, "prune", "--model", tmp_path / "scratch" / "checkpoint.pth", "--percent", "0.5",
                       "--save", tmp_path / "p2", "--data", cifar10_root, "--no-download")
    assert code == 0, err
    code, _, err = cli(capsys, "retrain", "--model", tmp_path / "p2" / "pruned.pth", "--data", cifar10_root,
                       "--no-download", "--rewind", "pretrained")
    assert_one_line_error(code, err, "started from a random init, not from --weights or --pretrained")


@pytest.mark.parametrize("value, needle", [("1.5", "outside its range"), ("0", "outside its range"),
                                           ("0.1x", "expected a fraction of an epoch")])
def test_a_bad_interval_is_one_line(capsys, tmp_path, cifar10_root, value, needle):
    try:
        code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY,
                           "--eb-interval", value, "--save", tmp_path / "s")
    except SystemExit as exc:  # argparse's own exit: not a number of either kind
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_an_interval_whose_bound_allows_no_channel_to_move_says_so(capsys, tmp_path, cifar10_root):
    pretrained(tmp_path / "pretrained.pth")
    code, out, err = search(capsys, tmp_path, cifar10_root, "--eb-threshold", "0.01", "--epochs", "1",
                            "--save", tmp_path / "s")
    assert code == 0, err
    assert "note: at this interval the bound lets no channel change places (0.002 x 172 channels < 2)" in out


def test_the_fine_tuning_pages_commands_run_as_written(capsys, tmp_path, monkeypatch):
    """docs/fine-tuning.md's two commands, on a small folder of images (the test's batch size and
    speed settings added): the file's weights, then timm's cache with the retrain rewound."""
    import re
    import shlex
    from pathlib import Path

    from test_own_images import write_folder
    from test_pretrained import write_timm_cache
    from test_zoo_models import _zoo

    _zoo("torchvision")
    timm = _zoo("timm")
    import huggingface_hub

    page = (Path(__file__).parents[1] / "docs" / "fine-tuning.md").read_text()
    block = re.search(r"```bash\n(.*?)```", page, re.S).group(1).replace("\\\n", " ")
    commands = [line.split() for line in block.splitlines() if line.startswith("earlybird ")]
    assert len(commands) == 2
    photos = write_folder(tmp_path / "photos", per_class=(32, 8), sizes=((72, 72),))  # the ImageNet stem
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(create_model(ModelSpec("resnet", 18, 1.0, 3, 1000, 224)).state_dict(), "resnet18-in1k.pth")
    write_timm_cache(tmp_path / "hub", timm.create_model("resnet18"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sized = ["--batch-size", "16", "--test-batch-size", "64", *FAST, "--cpu-kernels", "off"]
    for command, save in zip(commands, ("runs/ft", "runs/ft-rewound")):
        argv = shlex.split(" ".join(command).replace("~/photos", str(photos)))[1:]
        code, out, err = cli(capsys, *argv, *sized)
        assert code == 0, err
        summary = json.loads((tmp_path / save / "summary.json").read_text())
        assert summary["start"] and "its training not counted" in out
        drawn = [row for row in summary["ratios"] if row["eb_epoch"] is not None]
        assert drawn, out  # a ticket inside the 3 epochs, retrained as the command asks
        assert {row["rewind"] for row in drawn} == {"pretrained" if "--rewind" in argv else "ticket"}
