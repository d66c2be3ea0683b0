"""The command line end to end on tiny generated CIFAR files, and every bad input it must refuse."""
import argparse
import errno
import io
import json
import os

import pytest
import torch

from earlybird import files as files_module
from earlybird import progress as progress_module
from earlybird import stages
from earlybird.stages import pipeline
from earlybird.cli import main
from earlybird.train import load_checkpoint
from earlybird.train import trainer as trainer_module

TINY = ["--arch", "vgg", "--depth", "11", "--width", "0.0625", "--batch-size", "16", "--test-batch-size", "64",
        "--seed", "0"]


TRAINING_COMMANDS = {"search", "prune", "retrain", "run", "eval"}


def on_cpu(argv) -> list[str]:
    """``argv`` with --device cpu unless it names a device: the suite's runs are CPU runs on a GPU
    machine too (under auto they would take its GPUs; tests marked cuda are the GPU's); and on the
    plain-PyTorch path (--cpu-kernels off) unless it names one: the accelerator's tests turn it on."""
    argv = [str(a) for a in argv]
    if argv and argv[0] in TRAINING_COMMANDS:
        for flag, value in (("--device", "cpu"), ("--cpu-kernels", "off")):
            if flag not in argv and not (flag == "--cpu-kernels" and argv[0] == "eval"):  # eval runs no kernel of its own
                argv[1:1] = [flag, value]
    return argv


def cli(capsys, *argv):
    code = main(on_cpu(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_run_end_to_end(capsys, tmp_path, cifar10_root):
    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY,
                         "--epochs", 8, "--schedule", 4, 6, "--ratios", 0.3, 0.5, "--eb-window", 2,
                         "--eb-threshold", 0.5, "--measure-speed", "--save", save)
    assert code == 0, err
    summary = json.loads((save / "summary.json").read_text())
    search = json.loads((save / "search" / "summary.json").read_text())
    assert search["stopped_early"] and search["epochs_trained"] < 8
    for row in summary["ratios"]:
        tag = round(row["ratio"] * 100)
        epoch = row["eb_epoch"]
        assert epoch == search["tickets"][str(row["ratio"])]["epoch"]
        ticket = load_checkpoint(save / "search" / f"EB-{tag}-{epoch}.pth", ("ticket",))
        assert ticket["epoch"] == epoch and ticket["ratio"] == row["ratio"]
        pruned = json.loads((save / f"pruned-{tag}" / "summary.json").read_text())
        assert pruned["max_output_diff_pruned_vs_masked"] < 1e-4
        assert pruned["test_acc"]["masked"] == pruned["test_acc"]["pruned"]
        assert pruned["params"]["after"] < pruned["params"]["before"]
        retrain = json.loads((save / f"retrain-{tag}" / "summary.json").read_text())
        assert retrain["start_epoch"] == epoch and retrain["epochs_trained"] == 8 - epoch
        assert (save / f"retrain-{tag}" / "model_best.pth").exists() and (save / f"retrain-{tag}" / "checkpoint.pth").exists()
        assert row["compute_vs_train_prune_retrain"] < 1
        assert row["train_speedup_measured"] == pruned["training_throughput"]["speedup"] > 0
    lines = (save / "search" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == search["epochs_trained"]
    assert set(json.loads(lines[-1])["distances"]) == {"0.3", "0.5"}
    assert "EB ticket p=0.3" in out and "compute vs TPR" in out and "train speed" in out

    # a finished run is never overwritten without --force
    before = (save / "summary.json").read_bytes()
    code, _, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, *TINY, "--save", save)
    assert_one_line_error(code, err, "finished run", "--force")
    assert (save / "summary.json").read_bytes() == before


def test_fused_batch_norm_trains_and_can_be_turned_off(capsys, tmp_path, cifar10_root):
    # lr 0.01: at 0.1 this tiny network on random images turns rounding differences into a different
    # training within a few steps (a max-pool or ReLU decision flips) for most seeds, whichever kernel runs
    lr = ("--lr", "0.01")
    code, out, err = _search(capsys, cifar10_root, tmp_path / "fused", "--channels-last", "on", "--amp", "off",
                             "--cpu-kernels", "on", *lr)
    assert code == 0, err
    assert ("batch norm: 8 layers (8 with the activation after them, 4 with the max-pool after that) on "
            "earlybird's fused kernel") in out
    fused = json.loads((tmp_path / "fused" / "summary.json").read_text())
    code, out, err = _search(capsys, cifar10_root, tmp_path / "plain", "--channels-last", "on", "--amp", "off",
                             "--cpu-kernels", "off", *lr)
    assert code == 0, err
    assert "fused kernel" not in out
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert fused["epochs_trained"] == plain["epochs_trained"]
    # the same training up to float rounding
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pth", ("search",))["state_dict"] for run in ("fused", "plain"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-3, atol=1e-4), name
    assert any(not torch.equal(a[name], b[name]) for name in a)  # another kernel ran: it rounds differently


def _search(capsys, root, save, *extra):
    return cli(capsys, "search", "--dataset", "cifar10", "--data", root, "--no-download", *TINY, "--epochs", 4,
               "--schedule", 2, "--ratios", 0.5, "--full", "--save", save, *extra)


def interrupt_epoch(monkeypatch, n: int) -> None:
    """Ctrl-C in the ``n``-th training epoch of the process (counting every stage's)."""
    calls = {"n": 0}
    real = trainer_module.train_epoch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_epoch", interrupted)


def test_resume_continues_exactly_where_it_stopped(capsys, tmp_path, cifar10_root, monkeypatch):
    interrupt_epoch(monkeypatch, 3)
    code, out, err = _search(capsys, cifar10_root, tmp_path / "b")
    assert code == 130 and "--resume" in err
    started = next(line for line in out.splitlines() if line.startswith("training in "))
    # the same command again continues the unfinished run (as --resume does), in the setting it started with
    code, out, err = _search(capsys, cifar10_root, tmp_path / "b")
    assert code == 0, err
    assert "continuing it" in out and "after epoch 2" in out
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    resumed = f"training in {'channels-last' if b['speed']['channels_last'] else 'contiguous'} "
    assert started.startswith(resumed) and resumed in out and "as the run started" in out
    # an uninterrupted run in that setting ends where the interrupted one did
    setting = ["--channels-last", "on" if b["speed"]["channels_last"] else "off",
               "--amp", "on" if b["speed"]["autocast"] else "off"]
    assert _search(capsys, cifar10_root, tmp_path / "a", *setting)[0] == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 4 and a["speed"] == b["speed"]
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k].float(), b["state_dict"][k].float(), atol=1e-6), k
    assert torch.allclose(a["scores"], b["scores"], atol=1e-6)


def test_prune_and_retrain_commands(capsys, tmp_path, cifar10_root):
    assert _search(capsys, cifar10_root, tmp_path / "s")[0] == 0
    code, out, err = cli(capsys, "prune", "--model", tmp_path / "s" / "checkpoint.pth", "--percent", 0.4, "--data",
                         cifar10_root, "--measure-speed", "--save", tmp_path / "p")
    assert code == 0, err
    assert "masked" in out and (tmp_path / "p" / "pruned.pth").exists()
    # by default every layer keeps a multiple of 8 channels (or all it has); --round-to 1 removes exactly the ratio's
    rounded = json.loads((tmp_path / "p" / "summary.json").read_text())
    train = rounded["training_throughput"]  # measured at --batch-size, each network in its faster format
    assert train["batch"] == 256 and train["dense"]["setting"].split()[0] in ("contiguous", "channels-last")
    assert train["speedup"] == pytest.approx(train["pruned"]["images_per_s"] / train["dense"]["images_per_s"], rel=1e-2)
    assert "training on cpu, batch 256: dense" in out
    assert all(after % 8 == 0 or after == before for before, after in rounded["layers"].values())
    assert 0 < rounded["channels"]["removed"] < rounded["channels"]["requested"]
    code, out, err = cli(capsys, "prune", "--model", tmp_path / "s" / "checkpoint.pth", "--percent", 0.4, "--round-to",
                         1, "--data", cifar10_root, "--save", tmp_path / "p1")
    assert code == 0, err
    exact = json.loads((tmp_path / "p1" / "summary.json").read_text())["channels"]
    assert exact["removed"] == exact["requested"] == rounded["channels"]["requested"]
    # without --save the pruned network goes next to its source, named by the ratio
    assert cli(capsys, "prune", "--model", tmp_path / "s" / "checkpoint.pth", "--data", cifar10_root)[0] == 0
    assert (tmp_path / "s" / "pruned-50" / "pruned.pth").exists()
    code, out, err = cli(capsys, "retrain", "--scratch", tmp_path / "p" / "pruned.pth", "--reinit", "--data",
                         cifar10_root, "--epochs", 2, "--schedule", 1, "--batch-size", 16, "--save", tmp_path / "r")
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["reinit"] and summary["start_epoch"] == 0 and summary["epochs_trained"] == 2
    # a search checkpoint is not a pruned network
    code, _, err = cli(capsys, "retrain", "--model", tmp_path / "s" / "checkpoint.pth", "--data", cifar10_root,
                       "--save", tmp_path / "r2")
    assert_one_line_error(code, err, "'search' checkpoint", "pruned")
    # a ratio that would empty a layer when the collapse guard is off
    code, _, err = cli(capsys, "prune", "--model", tmp_path / "s" / "checkpoint.pth", "--percent", 0.99,
                       "--min-channels", 0, "--data", cifar10_root, "--save", tmp_path / "p99")
    assert_one_line_error(code, err, "would remove all", "--percent")


@pytest.mark.parametrize("argv,needles", [
    (["search", "--dataset", "mnist3"], ["unknown dataset 'mnist3'", "cifar10"]),
    # the model is checked before the data is looked for: cifar100 is absent from --data
    (["search", "--dataset", "cifar100", "--arch", "resnext999"], ["unknown architecture 'resnext999'", "vgg"]),
    (["run", "--dataset", "cifar100", "--depth", "12"], ["VGG depth 12", "--depth"]),
    (["search", "--ratios", "0.3", "1.0"], ["outside (0, 1)"]),
    (["search", "--ratios", "0"], ["outside (0, 1)"]),
    (["search", "--epochs", "10", "--schedule", "20"], ["--schedule"]),
    (["search", "--workers", "-1"], ["--workers"]),
    (["search", "--momentum", "-0.5"], ["--momentum"]),
    (["search", "--weight-decay=-1e-4"], ["--weight-decay"]),
    (["search", "--gamma", "0"], ["--gamma"]),
    (["search", "--threads", "0"], ["--threads"]),
    (["search", "--seed", "-1"], ["--seed"]),
    (["run", "--round-to", "0"], ["--round-to"]),
    (["run", "--latency-batches", "0"], ["--latency-batches"]),
    (["search", "--device", "cuda:0"] if not torch.cuda.is_available() else ["search", "--device", "tpu"],
     ["--device"]),
    (["prune", "--model", "missing.pth"], ["does not exist"]),
    (["retrain", "--model", "missing.pth"], ["does not exist"]),
])
def test_bad_input_gives_one_line_and_exit_2(capsys, tmp_path, cifar10_root, argv, needles):
    code, _, err = cli(capsys, *argv, "--data", cifar10_root, "--no-download", "--save", tmp_path / "x")
    assert_one_line_error(code, err, *needles)


def test_missing_data_without_network(capsys, tmp_path):
    code, _, err = cli(capsys, "search", "--dataset", "cifar100", "--data", tmp_path / "empty", "--no-download",
                       "--save", tmp_path / "x")
    assert_one_line_error(code, err, "cifar-100-python", "--data")


def test_corrupt_and_foreign_checkpoints(capsys, tmp_path, cifar10_root):
    bad = tmp_path / "EB-30-5.pth"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    code, _, err = cli(capsys, "prune", "--model", bad, "--data", cifar10_root, "--save", tmp_path / "p")
    assert_one_line_error(code, err, "truncated or corrupt")
    foreign = tmp_path / "foreign.pth.tar"
    torch.save({"state_dict": {}, "epoch": 3}, foreign)
    code, _, err = cli(capsys, "prune", "--model", foreign, "--data", cifar10_root, "--save", tmp_path / "p")
    assert_one_line_error(code, err, "not an earlybird checkpoint")
    assert not (tmp_path / "p" / "pruned.pth").exists()


def test_resume_with_another_architecture_is_refused(capsys, tmp_path, cifar10_root):
    assert _search(capsys, cifar10_root, tmp_path / "s")[0] == 0
    (tmp_path / "s" / "summary.json").unlink()  # pretend it was interrupted
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY[:3], "13",
                       *TINY[4:], "--epochs", 4, "--schedule", 2, "--ratios", 0.5, "--save", tmp_path / "s", "--resume")
    assert_one_line_error(code, err, "was saved for vgg11", "--depth")


def test_flag_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--lr", "fast"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--lr" in err and "--help" in err


def test_help_documents_every_flag(capsys):
    for command in ("search", "prune", "retrain", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        for flag in ("--dataset", "--data", "--save", "--force", "--test-batch-size"):
            assert flag in out, (command, flag)
        for flag in ("--seed", "--resume"):  # training's: prune trains nothing
            assert (flag in out) == (command != "prune"), (command, flag)
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    for flag in ("--arch", "--depth", "--lr", "--epochs", "--schedule", "--batch-size", "--momentum",
                 "--weight-decay", "--sparsity-regularization", "--s ", "--ratios", "--eb-threshold", "--eb-window",
                 "--full", "--width"):
        assert flag in out, flag


def test_run_resume_skips_finished_stages(capsys, tmp_path, cifar10_root, monkeypatch):
    args = ["run", "--dataset", "cifar10", "--data", cifar10_root, *TINY, "--epochs", 6, "--schedule", 3,
            "--ratios", 0.5, "--eb-window", 2, "--eb-threshold", 0.5, "--channels-last", "--save", tmp_path / "run"]
    real = pipeline.retrain

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "retrain", crash)
    assert cli(capsys, *args)[0] == 130
    search_summary = (tmp_path / "run" / "search" / "summary.json").read_bytes()
    monkeypatch.setattr(pipeline, "retrain", real)
    code, out, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    assert "search epoch" not in out  # the finished search is not repeated
    assert (tmp_path / "run" / "search" / "summary.json").read_bytes() == search_summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ratios"][0]["acc_retrained"] is not None


def test_run_without_a_ticket_reports_it(capsys, tmp_path, cifar10_root):
    code, out, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, *TINY, "--epochs", 3,
                         "--schedule", 2, "--ratios", 0.5, "--save", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    row = summary["ratios"][0]
    assert summary["search_epochs"] == 3 and row["eb_epoch"] is None and row["closest"] is None
    last = tmp_path / "run" / "search" / "checkpoint.pth"
    # what to do next, down to the command that prunes where the search stopped
    assert "no ticket within 3 epochs: the window of 5 masks never filled" in out
    assert f"earlybird prune --model {last} --percent 0.5" in out and "larger --eb-threshold" in out
    assert "even to chance" in out  # why a ticket's accuracy before retraining can be so low
    assert not (tmp_path / "run" / "pruned-50").exists()


def test_progress_bars_on_a_terminal(capsys, tmp_path, cifar10_root):
    from earlybird.config import DataConfig, DetectConfig, ModelConfig, OptimConfig, RuntimeConfig
    from earlybird.progress import Reporter

    data = DataConfig(dataset="cifar10", data=str(cifar10_root), download=False, batch_size=8)
    summary = stages.search(data, ModelConfig(depth=11, width=0.0625), OptimConfig(epochs=1, schedule=[]),
                            DetectConfig(ratios=[0.5]), RuntimeConfig(save=str(tmp_path / "s"), device="cpu"), Reporter(bars=True))
    err = capsys.readouterr().err
    assert summary["epochs_trained"] == 1
    assert "search 1/1" in err and "img/s" in err and "loss" in err


def test_bad_places_and_wrong_data_for_a_checkpoint(capsys, tmp_path, cifar10_root, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = _search(capsys, cifar10_root, a_file)
    assert_one_line_error(code, err, "is a file", "--save")
    assert _search(capsys, cifar10_root, tmp_path / "s")[0] == 0
    for command in (["prune", "--save", tmp_path / "p"], ["eval"]):
        code, _, err = cli(capsys, *command, "--model", tmp_path / "s" / "checkpoint.pth", "--dataset", "cifar100",
                           "--data", cifar10_root)
        assert_one_line_error(code, err, "trained on cifar10, not cifar100", "--dataset")
    # the metrics file cannot be written (here: a directory stands in its way, like a full disk would)
    save = tmp_path / "m"
    (save / "metrics.jsonl").mkdir(parents=True)
    code, _, err = _search(capsys, cifar10_root, save)
    assert_one_line_error(code, err, "could not write", "metrics.jsonl", "run the same command again")
    assert (save / "checkpoint.pth").exists()  # the epoch itself was saved first


def test_every_command_runs_on_plain_pytorch_without_the_cpu_kernels(capsys, tmp_path, cifar10_root, monkeypatch):
    from earlybird.accel import batch_norm, speed

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU kernel was used under --cpu-kernels off")

    for module, name in ((batch_norm, "load"), (speed, "gemm_convolutions"), (speed, "keep_freed_memory")):
        monkeypatch.setattr(module, name, refuse)
    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY,
                         "--epochs", 4, "--schedule", 2, "--ratios", 0.5, "--eb-window", 2, "--eb-threshold", 0.5,
                         "--channels-last", "on", "--measure-speed", "--latency-batches", 2, "--cpu-kernels", "off",
                         "--save", save)
    assert code == 0, err
    assert "fused kernel" not in out and "GEMM" not in out
    pruned = json.loads((save / "pruned-50" / "summary.json").read_text())
    assert pruned["training_throughput"]["speedup"] > 0 and pruned["throughput"]["2"]["speedup"] > 0
    for argv in (("eval", "--model", save / "retrain-50" / "model_best.pth", "--data", cifar10_root),
                 ("retrain", "--model", save / "pruned-50" / "pruned.pth", "--data", cifar10_root, "--epochs", 4,
                  "--schedule", 2, "--reinit", "--batch-size", 16, "--save", tmp_path / "again"),
                 ("report", save)):
        code, _, err = cli(capsys, *argv)
        assert code == 0, err


def test_the_schedule_defaults_to_half_and_three_quarters_of_the_epochs(capsys, tmp_path, cifar10_root):
    from earlybird.config import OptimConfig

    assert OptimConfig().schedule == [80, 120] and OptimConfig(epochs=26).schedule == [13, 19]
    assert OptimConfig(epochs=1).schedule == [] and OptimConfig(epochs=4, schedule=[]).schedule == []
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY, "--epochs", 1,
                       "--ratios", 0.5, "--save", tmp_path / "s")  # no --schedule: it used to refuse 80 120
    assert code == 0, err
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY, "--epochs", 2,
                       "--schedule", 5, "--save", tmp_path / "t")
    assert_one_line_error(code, err, "--schedule [5] must lie within 0..2")


def test_configs_validate_themselves_and_one_table_builds_the_cli():
    from earlybird import ConfigError
    from earlybird.cli import COMMANDS, build_parser
    from earlybird.config import LowPrecisionConfig, OptimConfig, RunArgs, WidthConfig, command_from_args

    with pytest.raises(ConfigError, match="--epochs 0 must be at least 1"):
        OptimConfig(epochs=0)
    with pytest.raises(ConfigError, match="--round-to 0"):
        WidthConfig(round_to=0)
    with pytest.raises(ConfigError, match="--swa-start 9 must be in 0..4"):
        LowPrecisionConfig(swa=True, swa_start=9).check_schedule(OptimConfig(epochs=5, schedule=[]))
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(commands.choices) == list(COMMANDS)
    args = command_from_args(RunArgs, parser.parse_args(["run", "--reinit", "--ratios", "0.5", "--eb-rule", "chain"]))
    assert args.pipeline.reinit and not args.pipeline.baseline and args.detect.ratios == [0.5]
    assert args.detect.eb_rule == "chain" and args.rt.cpu_kernels == "on"


def test_a_second_process_on_the_same_save_refuses_in_one_line(capsys, tmp_path, cifar10_root):
    import subprocess
    import sys

    save = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from earlybird.stages.rundir import RunDir; RunDir(Path(sys.argv[1])).lock(); "
                               "print('locked', flush=True); time.sleep(60)", str(save)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in ("search", "run"):
            code, _, err = _search(capsys, cifar10_root, save) if command == "search" else cli(
                capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, *TINY, "--epochs", 2, "--save", save)
            assert_one_line_error(code, err, f"(pid {holder.pid}) is writing to {save}", "choose another --save")
        assert sorted(p.name for p in save.iterdir()) == [".lock"]  # nothing of the refused runs written
    finally:
        holder.kill()
        holder.wait()
    assert _search(capsys, cifar10_root, save)[0] == 0  # the lock went with its process


def test_the_reference_spelling_of_preresnet_points_to_it(capsys, tmp_path, cifar10_root):
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--arch", "resnet", "--depth",
                       56, "--save", tmp_path / "s")
    assert_one_line_error(code, err, "reference code's CIFAR pre-activation ResNet", "--arch preresnet --depth 56")
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--arch", "resnet", "--depth",
                       60, "--save", tmp_path / "t")
    assert_one_line_error(code, err, "not one of [18, 34, 50, 101, 152]")


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tmp_path, cifar10_root):
    import signal
    import subprocess
    import sys

    argv = [sys.executable, "-m", "earlybird", "search", "--device", "cpu", "--cpu-kernels", "off", "--dataset",
            "cifar10", "--data", str(cifar10_root), "--no-download", *map(str, TINY), "--epochs", "40", "--ratios",
            "0.5", "--full", "--save", str(tmp_path / "s")]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:  # a scheduler's SIGTERM once an epoch is saved
        if line.startswith("search epoch 2/40"):
            run.send_signal(signal.SIGTERM)
            break
    out, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("earlybird search: terminated; the last completed epoch is saved") and "Traceback" not in err
    epoch = load_checkpoint(tmp_path / "s" / "checkpoint.pth")["epoch"]
    assert 2 <= epoch < 40
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # the same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming search from {tmp_path / 's' / 'checkpoint.pth'} after epoch {epoch}" in again.stdout
    assert load_checkpoint(tmp_path / "s" / "checkpoint.pth")["epoch"] == 40


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes."""

    room = 100

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def fill_disk_at(monkeypatch, name: str, n: int) -> None:
    """The ``n``-th temporary file written for ``name`` hits a full disk (torch.save raises its
    RuntimeError while handling the OSError, as on a real full disk)."""
    real, seen = os.fdopen, []

    def fdopen(fd, mode="r", *args, **kwargs):
        if f".{name}." in os.readlink(f"/proc/self/fd/{fd}") and "w" in mode:
            seen.append(fd)
            if len(seen) == n:
                return _FullDisk(fd, "wb")
        return real(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize("name", ["checkpoint.pth", "metrics.jsonl", "summary.json"])
def test_a_full_disk_is_one_line_and_the_same_command_resumes(capsys, tmp_path, cifar10_root, monkeypatch, name):
    save = tmp_path / "s"
    if name == "metrics.jsonl":  # appended, not replaced: the third row finds no room
        real = files_module.append_line
        rows = []

        def append_line(path, line):
            rows.append(line)
            if len(rows) == 3:
                raise files_module.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), len(line))
            real(path, line)

        monkeypatch.setattr(progress_module, "append_line", append_line)
    else:
        fill_disk_at(monkeypatch, name, 2 if name == "checkpoint.pth" else 1)
    code, out, err = _search(capsys, cifar10_root, save)
    where, resume = {"checkpoint.pth": ("checkpoint.pth", "resumes after epoch 1"),
                     "metrics.jsonl": ("metrics.jsonl", "resumes after epoch 3"),
                     "summary.json": ("summary.json", "resumes after epoch 4, the last, and writes the summary")}[name]
    assert_one_line_error(code, err, f"could not write {save / where}: No space left on device (it needs about",
                          "free there", "previous version is intact", resume)
    left = sorted(p.name for p in save.iterdir())
    assert not [n for n in left if n.endswith(".tmp")], left
    saved = load_checkpoint(save / "checkpoint.pth")["epoch"]
    assert saved == {"checkpoint.pth": 1, "metrics.jsonl": 3, "summary.json": 4}[name]
    monkeypatch.undo()  # space freed: the same command continues
    code, out, err = _search(capsys, cifar10_root, save)
    assert code == 0, err
    assert f"after epoch {saved}" in out and load_checkpoint(save / "checkpoint.pth")["epoch"] == 4
    epochs = [json.loads(line)["epoch"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [e for e in range(1, 5) if not (name == "metrics.jsonl" and e == 3)]  # no half row


def test_prune_retrain_and_eval_read_the_data_where_the_search_read_it(capsys, tmp_path, cifar10_root, monkeypatch):
    # the documented `earlybird prune --model .../EB-50-2.pth` after `search --data DIR`: no --data, no
    # download into ./data; a later --data still wins
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch", "vgg",
                       "--depth", 11, "--width", 0.0625, "--batch-size", 16, "--epochs", 2, "--ratios", 0.5, "--full",
                       "--save", "s")
    assert code == 0, err
    code, _, err = cli(capsys, "prune", "--model", "s/checkpoint.pth", "--percent", 0.5, "--no-download",
                       "--latency-batches", "--save", "p")
    assert code == 0, err
    code, _, err = cli(capsys, "retrain", "--model", "p/pruned.pth", "--epochs", 3, "--no-download", "--save", "r")
    assert code == 0, err
    code, out, err = cli(capsys, "eval", "--model", "r/model_best.pth", "--no-download")
    assert code == 0 and "on cifar10 test (16 images)" in out, err
    assert not (tmp_path / "data").exists()
    code, _, err = cli(capsys, "eval", "--model", "r/model_best.pth", "--no-download", "--data", tmp_path / "elsewhere")
    assert code == 2 and "elsewhere" in err
