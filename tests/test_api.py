"""The library example of README.md runs as written, and its result is right."""
import re
from pathlib import Path

import torch

import earlybird

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its library example"
    return match.group(1)


def test_readme_library_example(capsys):
    scope: dict = {}
    exec(compile(readme_example(), str(README), "exec"), scope)
    out = capsys.readouterr().out
    detector, model, small, x = scope["detector"], scope["model"], scope["small"], scope["x"]
    assert detector.done and set(detector.emerged) == {0.3, 0.5}
    assert all(f"at epoch {e}" in out for e in detector.emerged.values())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    masked = earlybird.apply_mask(model, detector.tickets[0.5]).eval()
    with torch.no_grad():
        assert torch.allclose(small.eval()(x[:8]), masked(x[:8]), atol=1e-5)


def test_readme_layout_names_every_module_and_the_core_needs_no_accelerator():
    import ast

    src = README.parent / "src" / "earlybird"
    layout = README.read_text().split("src/earlybird/\n", 1)[1].split("```", 1)[0]
    for path in src.glob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            assert f"  {path.name}" in layout, f"README.md's layout lacks {path.name}"
    for package in (p for p in src.iterdir() if (p / "__init__.py").exists()):
        assert f"  {package.name}/" in layout, f"README.md's layout lacks {package.name}/"
    # the method's core and the models import neither the accelerator nor files nor flags
    for name in ("masks.py", "importance.py", "rules.py", "detector.py", "sparsity.py", "prune/engine.py",
                 "prune/layers.py", "models/resnet.py", "models/densenet.py", "models/layers.py"):
        tree = ast.parse((src / name).read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.split(".")[-1] in ("accel", "config", "cli", "stages", "argparse") or "accel" in m
                       for m in imported), (name, imported)
