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
