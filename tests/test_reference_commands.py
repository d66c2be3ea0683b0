"""The reference README's commands, in its own flag spellings, run through earlybird (README table)."""
import json

from test_cli import assert_one_line_error, cli

SMALL = ["--dataset", "cifar10", "--no-download", "--batch-size", "16", "--test-batch-size", "64", "--lr", "0.1",
         "--epochs", "4", "--schedule", "2", "3", "--momentum", "0.9"]


def test_reference_pipeline_in_its_own_words(capsys, tmp_path, cifar10_root):
    base = tmp_path / "baseline" / "vgg11-cifar10"
    # main.py --sparsity-regularization ... -> earlybird search
    code, _, err = cli(capsys, "search", *SMALL, "--data", cifar10_root, "--arch", "vgg", "--depth", 11, "--width",
                       0.0625, "--save", base, "--sparsity-regularization", "--ratios", 0.3, "--full")
    assert code == 0, err
    assert (base / "checkpoint.pth").exists()
    ticket = base / json.loads((base / "summary.json").read_text())["tickets"]["0.3"]["path"] \
        if json.loads((base / "summary.json").read_text())["tickets"] else base / "checkpoint.pth"
    # vggprune.py --depth --percent --model --save -> earlybird prune (the depth is checked)
    code, _, err = cli(capsys, "prune", "--dataset", "cifar10", "--data", cifar10_root, "--test-batch-size", 64,
                       "--depth", 11, "--percent", 0.3, "--model", ticket, "--save", base / "pruned_30_0.3",
                       "--latency-batches")
    assert code == 0, err
    code, _, err = cli(capsys, "prune", "--data", cifar10_root, "--depth", 16, "--percent", 0.3, "--model", ticket,
                       "--save", tmp_path / "wrong")
    assert_one_line_error(code, err, "not vgg16", "--depth")
    # main_c.py --scratch ... --start_epoch -> earlybird retrain (fine-tune)
    code, _, err = cli(capsys, "retrain", *SMALL, "--data", cifar10_root, "--arch", "vgg", "--depth", 11,
                       "--save", base / "retrain_30_0.3", "--sparsity-regularization",
                       "--scratch", base / "pruned_30_0.3" / "pruned.pth", "--start_epoch", 2)
    assert code == 0, err
    summary = json.loads((base / "retrain_30_0.3" / "summary.json").read_text())
    assert summary["start_epoch"] == 2 and (base / "retrain_30_0.3" / "model_best.pth").exists()
    # main_scratch.py -> earlybird retrain --reinit
    code, _, err = cli(capsys, "retrain", *SMALL, "--data", cifar10_root, "--scratch",
                       base / "pruned_30_0.3" / "pruned.pth", "--reinit", "--save", base / "scratch")
    assert code == 0, err
    # main_lp.py --swa True --swa_start ... --wl-* 8 --rounding stochastic -> earlybird search
    code, _, err = cli(capsys, "search", *SMALL, "--data", cifar10_root, "--arch", "vgg", "--depth", 11, "--width",
                       0.0625, "--save", tmp_path / "lp", "--sparsity-regularization", "--swa", "True", "--swa_start",
                       2, "--wl-weight", 8, "--wl-grad", 8, "--wl-activate", 8, "--wl-error", 8, "--wl-momentum", 8,
                       "--rounding", "stochastic", "--ratios", 0.3, "--full")
    assert code == 0, err
    assert (tmp_path / "lp" / "swa.pth").exists()
    # EVAL_*.py --resume model_best -> earlybird eval
    code, out, err = cli(capsys, "eval", "--data", cifar10_root, "--arch", "vgg", "--depth", 11, "--model",
                         base / "retrain_30_0.3" / "model_best.pth")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["top1"] == summary["best_test_acc"]
