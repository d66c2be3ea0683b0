"""Each command shows and accepts only the flags its function reads: every command runs here with
its configs recording which of their fields are read, and each flag its parser shows must be one."""
import dataclasses
import sys

import pytest
import torch

from earlybird import cli as cli_module
from earlybird.cli import COMMANDS, main
from earlybird.config import shown_fields

from test_cli import TINY, assert_one_line_error, cli, on_cpu
from test_reference_import import reference_layout

SEARCH = ["--dataset", "cifar10", "--no-download", *TINY, "--epochs", "3", "--ratios", "0.5", "--eb-window", "2",
          "--eb-threshold", "0.9"]


def _recorder(cls, seen: set):
    """A subclass of config ``cls`` noting each field the command reads (not the reads of its own
    validation, nor dataclasses.replace copying it)."""
    names = {f.name for f in dataclasses.fields(cls)}

    def __getattribute__(self, name):
        if name in names:
            caller = sys._getframe(1).f_code
            if caller.co_name != "__post_init__" and not caller.co_filename.endswith("dataclasses.py"):
                seen.add(name)
        return object.__getattribute__(self, name)

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})


@pytest.fixture
def reads(monkeypatch):
    """{command: {config field of the command: fields read}}, filled by the commands run meanwhile."""
    seen: dict = {}
    build = cli_module.command_from_args

    def recording(command_cls, ns):
        config = build(command_cls, ns)
        for f in dataclasses.fields(config):
            obj = getattr(config, f.name)
            obj.__class__ = _recorder(type(obj), seen.setdefault(ns.command, {}).setdefault(f.name, set()))
        return config

    monkeypatch.setattr(cli_module, "command_from_args", recording)
    return seen


def _shown(name: str) -> dict:
    return {f.name: {g.name for g in shown_fields(f)} for f in dataclasses.fields(COMMANDS[name].args)}


def test_every_command_reads_every_flag_it_shows(tmp_path, cifar10_root, small_vgg, reads, monkeypatch, capsys):
    def ok(*argv):
        code = main(on_cpu(argv))
        assert code == 0, capsys.readouterr().err

    data = ["--data", str(cifar10_root)]
    ok("search", *SEARCH, *data, "--save", tmp_path / "s")
    ticket = next((tmp_path / "s").glob("EB-50-*.pth"))
    ok("run", *SEARCH, *data, "--measure-speed", "--save", tmp_path / "run")
    ok("prune", "--model", ticket, "--measure-speed", "--percent", "0.4", "--save", tmp_path / "p")
    pruned = tmp_path / "p" / "pruned.pth"
    ok("retrain", "--model", pruned, "--epochs", "4", "--batch-size", "16", "--save", tmp_path / "r")
    ok("eval", "--model", pruned, "--amp", "on")
    ok("export", "--model", pruned, "--format", "torchscript")
    ok("export", "--model", pruned, "--format", "torchscript", "--force")  # --force is read where the file exists
    ok("report", tmp_path / "s")
    ref = tmp_path / "EB-30-5.pth.tar"
    torch.save({"state_dict": reference_layout(small_vgg.state_dict(), "vgg"), "epoch": 5}, ref)
    for extra in ([], ["--force"]):  # --force is read where the file exists
        ok("import-reference", "--model", ref, "--arch", "vgg", "--depth", "11", "--width", "0.125", "--dataset",
           "cifar10", "--out", tmp_path / "imported.pth", *extra)
    ok("models")
    # --port is read where --gpu-ids starts workers: the launcher stands in for torchrun's
    from earlybird.train import distributed
    monkeypatch.setattr(distributed, "launch_on_gpus", lambda ids, argv, port: 0 if port == 29555 else 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("search", "run", "prune", "retrain", "eval"):
        assert main([name, "--gpu-ids", "0,1", "--port", "29555"]) == 0

    for name in COMMANDS:
        for part, shown in _shown(name).items():
            unread = shown - reads.get(name, {}).get(part, set())
            assert not unread, f"earlybird {name} shows flags it never reads ({part}): {sorted(unread)}"


@pytest.mark.parametrize("argv, flag", [
    (["export", "--model", "x.pth", "--sync-bn"], "--sync-bn"),
    (["export", "--model", "x.pth", "--tensorboard"], "--tensorboard"),
    (["export", "--model", "x.pth", "--compile"], "--compile"),
    (["export", "--model", "x.pth", "--resume"], "--resume"),
    (["export", "--model", "x.pth", "--port", "5"], "--port"),
    (["export", "--model", "x.pth", "--seed", "3"], "--seed"),
    (["eval", "--model", "x.pth", "--sync-bn"], "--sync-bn"),
    (["eval", "--model", "x.pth", "--resume"], "--resume"),
    (["eval", "--model", "x.pth", "--save", "out"], "--save"),
    (["import-reference", "--model", "x.pth", "--epochs", "3"], "--epochs"),
    (["import-reference", "--model", "x.pth", "--save", "x.pth"], "--save"),
    (["prune", "--model", "x.pth", "--tensorboard"], "--tensorboard"),
    (["prune", "--model", "x.pth", "--train-subset", "5"], "--train-subset"),
])
def test_a_flag_a_command_does_not_use_is_refused(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"unrecognized arguments: {flag}" in err


@pytest.mark.parametrize("argv, needle", [
    (["search", "--dataset", "folder", "--image-column", "img"], "--image-column applies to hf: datasets, not to folder"),
    (["search", "--dataset", "cifar10", "--image-size", "64"], "--image-size applies to your own images"),
    (["run", "--dataset", "fashion-mnist", "--cache", "on"], "--cache applies to your own images"),
    (["search", "--image-size", "64"], "--image-size applies to your own images (--dataset folder or hf:), not to "
                                       "fashion-mnist"),  # the default dataset, named by search itself
])
def test_an_option_of_another_kind_of_dataset_is_refused(capsys, tmp_path, argv, needle):
    code, out, err = cli(capsys, *argv, "--data", tmp_path, "--save", tmp_path / "run")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_an_option_of_another_kind_is_refused_for_a_checkpoints_dataset_too(capsys, tmp_path, cifar10_root):
    code, out, err = cli(capsys, "search", *SEARCH, "--data", cifar10_root, "--save", tmp_path / "s")
    assert code == 0, err
    ticket = next((tmp_path / "s").glob("EB-50-*.pth"))
    for command in ("prune", "eval"):
        code, out, err = cli(capsys, command, "--model", ticket, "--label-column", "y")
        assert_one_line_error(code, err, "--label-column applies to hf: datasets, not to cifar10")
