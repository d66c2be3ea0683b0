"""`run --baseline` measures train-prune-retrain; `report` renders real figures from a small run."""
import json

import numpy as np
from PIL import Image

from test_cli import cli


def test_baseline_and_report(capsys, tmp_path, cifar10_root):
    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch",
                         "vgg11", "--width", "0.0625", "--batch-size", "16", "--test-batch-size", "64", "--epochs", 6,
                         "--schedule", 3, 5, "--ratios", 0.3, 0.5, "--eb-window", 2, "--eb-threshold", 0.5,
                         "--latency-batches", "--baseline", "--save", save)
    assert code == 0, err
    summary = json.loads((save / "summary.json").read_text())
    base = summary["baseline"]
    assert set(base["ratios"]) == {"0.3", "0.5"} and base["train_s"] > 0
    dense = json.loads((save / "baseline" / "search" / "summary.json").read_text())
    assert dense["epochs_trained"] == 6  # the whole schedule, continued from the EB search
    for tag in ("30", "50"):
        retrain = json.loads((save / "baseline" / f"retrain-{tag}" / "summary.json").read_text())
        assert retrain["start_epoch"] == 0 and retrain["epochs_trained"] == 6  # fine-tuned over the whole schedule
    # the same measured compute the summary compares: EB Train spends less than the baseline
    assert summary["total_train_macs"] < base["train_macs"]
    assert "measured train-prune-retrain" in out

    code, out, err = cli(capsys, "report", save)
    assert code == 0, err
    page = (save / "report" / "report.md").read_text()
    assert "Measured baseline" in page and "| 0.3 |" in page
    # --latency-batches (none) skipped the prune stage's timings: the speed-up column says so
    assert summary["ratios"][0]["train_speedup_measured"] is None and "training speed (measured)" in page
    row = next(line for line in page.splitlines() if line.startswith("| 0.3 | ") and "→" in line)
    assert " | - | " in row
    for name in ("heatmap", "distances", "curves", "gammas", "channels"):
        path = save / "report" / f"{name}.png"
        assert f"![{name}.png]" in page
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 300
            pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
        # a real figure: many colours and no single colour covering nearly everything
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        assert len(colours) > 50 and counts.max() < 0.97 * len(pixels), name


def test_report_of_a_directory_without_a_run(capsys, tmp_path):
    code, _, err = cli(capsys, "report", tmp_path)
    assert code == 2 and "holds no search" in err


def test_tensorboard_scalars_beside_the_jsonl(capsys, tmp_path, cifar10_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch",
                       "vgg11", "--width", "0.0625", "--batch-size", "16", "--epochs", 2, "--schedule", 1, "--ratios",
                       0.5, "--full", "--tensorboard", "--save", tmp_path / "s")
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "s" / "tensorboard"))
    events.Reload()
    acc = events.Scalars("search/test_acc")
    jsonl = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc] == [1, 2]
    assert [round(e.value, 3) for e in acc] == [round(m["test_acc"], 3) for m in jsonl]


def test_report_draws_a_run_with_a_budget_ticket(capsys, tmp_path, cifar10_root):
    # a budget target (macs50) is a key, not a ratio: its ticket is drawn and tabled beside p = 0.5
    save = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch", "vgg11",
                       "--width", "0.0625", "--batch-size", "16", "--test-batch-size", "64", "--epochs", 4,
                       "--schedule", 2, "--ratios", 0.5, "--target-macs", 0.5, "--eb-window", 2, "--eb-threshold", 0.5,
                       "--latency-batches", "--save", save)
    assert code == 0, err
    assert json.loads((save / "search" / "summary.json").read_text())["tickets"].keys() == {"0.5", "macs50"}
    code, out, err = cli(capsys, "report", save)
    assert code == 0, err
    page = (save / "report" / "report.md").read_text()
    assert "| macs50 | " in page and "| 0.5 | " in page
    assert next(line for line in page.splitlines() if line.startswith("| macs50 | ") and "→" in line)
    for name in ("distances", "curves", "channels"):
        with Image.open(save / "report" / f"{name}.png") as img:
            assert img.size[0] > 300
