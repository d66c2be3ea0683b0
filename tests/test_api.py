"""The documentation keeps up: its library examples run as written, every CLI flag is in the reference,
the layout names every module, and README.md stays short."""
import re
from pathlib import Path

import pytest
import torch

import earlybird

ROOT = Path(__file__).resolve().parents[1]
README, LIBRARY, CLI, LAYOUT = (ROOT / "README.md", ROOT / "docs" / "library.md", ROOT / "docs" / "cli.md",
                                ROOT / "docs" / "development.md")


def readme_example() -> str:
    text = LIBRARY.read_text()
    match = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/library.md lost its library example"
    return match.group(1)


def test_readme_library_example(capsys):
    scope: dict = {}
    exec(compile(readme_example(), str(LIBRARY), "exec"), scope)
    out = capsys.readouterr().out
    detector, model, small, x = scope["detector"], scope["model"], scope["small"], scope["x"]
    assert detector.done and set(detector.emerged) == {0.3, 0.5}
    assert all(f"at epoch {e}" in out for e in detector.emerged.values())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    masked = earlybird.apply_mask(model, detector.tickets[0.5]).eval()
    with torch.no_grad():
        assert torch.allclose(small.eval()(x[:8]), masked(x[:8]), atol=1e-5)


def test_the_fine_tuning_example_draws_inside_the_first_epoch_and_rewinds(capsys, tmp_path, monkeypatch):
    code = re.search(r"<!-- fine-tuning-example -->\s*```python\n(.*?)```", LIBRARY.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.split("torch.manual_seed(0)")[0], str(LIBRARY), "exec"), scope)  # its network(), to pretrain
    torch.manual_seed(1)
    pretrained = scope["network"](10)
    with torch.no_grad():  # pretrained scales are spread out: a gentle fine-tune keeps their order
        for _, bn in earlybird.prunable_bns(pretrained):
            bn.weight.copy_(torch.rand(bn.num_features) + 0.05)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pth")
    exec(compile(code, str(LIBRARY), "exec"), scope)
    out = capsys.readouterr().out
    assert "loaded 12 tensors, left 8.weight, 8.bias new for the classes" in out  # BN statistics included
    detector, model, small, rewound, x = (scope[k] for k in ("detector", "model", "small", "rewound", "x"))
    assert 0 < detector.emerged[0.5] < 1 and f"at epoch {detector.emerged[0.5]:.2f}" in out  # inside the first epoch
    plan = scope["plan"]
    inputs = (x[:64], torch.rand(16, 3, 16, 16) * 3)
    with torch.no_grad():
        for net, dense in ((small, model), (scope["small_pretrained"], rewound)):
            masked = earlybird.apply_mask(dense, plan.masks(dense), plan.zeroed).eval()
            for xb in inputs:
                torch.testing.assert_close(net.eval()(xb), masked(xb), rtol=1e-5, atol=1e-5)
    first = dict(rewound.named_parameters())["0.weight"]
    assert torch.equal(first, pretrained[0].weight)  # the rewound network holds the pretrained weights


def test_readme_layout_names_every_module_and_the_core_needs_no_accelerator():
    import ast

    src = ROOT / "src" / "earlybird"
    layout = LAYOUT.read_text().split("src/earlybird/\n", 1)[1].split("```", 1)[0]
    for path in src.glob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            assert f"  {path.name}" in layout, f"docs/development.md's layout lacks {path.name}"
    for package in (p for p in src.iterdir() if (p / "__init__.py").exists()):
        assert f"  {package.name}/" in layout, f"docs/development.md's layout lacks {package.name}/"
    # the method's core and the models import neither the accelerator nor files nor flags
    for name in ("masks.py", "importance.py", "rules.py", "detector.py", "sparsity.py", "prune/engine.py",
                 "prune/layers.py", "models/resnet.py", "models/densenet.py", "models/layers.py"):
        tree = ast.parse((src / name).read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.split(".")[-1] in ("accel", "config", "cli", "stages", "argparse") or "accel" in m
                       for m in imported), (name, imported)


def test_the_cli_reference_names_every_flag_of_every_command():
    import argparse

    from earlybird.cli import COMMANDS, build_parser

    text = CLI.read_text()
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(COMMANDS)
    missing = [f"{name} {flag}" for name, sub in commands.items() for action in sub._actions
               for flag in action.option_strings if flag not in ("-h", "--help") and f"`{flag}`" not in text]
    assert not missing, f"docs/cli.md lacks {missing}: run python scripts/cli_reference.py and update it"


def test_the_other_library_examples_run():
    """The README's loop and docs/library.md's own-criterion example, on a real model."""
    blocks = re.findall(r"```python\n(.*?)```", LIBRARY.read_text(), re.S)
    own = next(b for b in blocks if "class Reversed" in b)
    model = earlybird.create_model(earlybird.ModelSpec("vgg", 11, 0.125, 3, 10, 32))
    scope = {"earlybird": earlybird, "model": model}
    exec(compile(own, str(LIBRARY), "exec"), scope)
    detector = scope["detector"]
    assert detector.importance.name == "reversed" and detector.rule.name == "chain"
    loop = re.search(r"```python\n(import earlybird\n.*?)```", README.read_text(), re.S).group(1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # a settled search: the same scales every epoch
        for bn in earlybird.prunable_bns(model):
            bn[1].weight.copy_(torch.rand(bn[1].weight.shape))
    scope = {"model": model, "x": x, "epochs": 6, "Ellipsis": ...}
    exec(compile(loop, str(README), "exec"), scope)
    small = scope["small"]
    assert scope["detector"].done and sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in model.parameters())


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("cores", [1, 64])
def test_the_cli_reference_is_docs_cli_md_on_any_machine(cores):
    # generated on a machine of another core count, the tables are the same: no default there is the
    # writing machine's (--workers said "(default: 2)" on a 2-core machine)
    import subprocess
    import sys

    code = (f"import os; os.cpu_count = lambda: {cores}; import runpy; "
            "runpy.run_path('scripts/cli_reference.py', run_name='__main__')")
    generated = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    text = CLI.read_text()
    assert text[text.index("## Every flag, by command"):].strip() == generated.strip(), \
        "docs/cli.md differs from the parser: run python scripts/cli_reference.py and update it"
