"""Users add passes without editing mmc: the README's worked example runs here, end to end;
--verify-each names a pass that breaks the model; a failed compile loses nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_mmc

README = Path(__file__).resolve().parents[1] / "README.md"

BREAKING_PASS = '''
import numpy as np
import onnx_graphsurgeon as gs
from mmc.registry import PassResult, register_pass

@register_pass
class FlipFirstWeight:
    name = "flip-first-weight"
    summary = "a broken pass: negates one weight"

    def run(self, graph, ctx):
        for node in graph.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and t.values.size > 16 and t.values.dtype == np.float32:
                    node.inputs[i] = gs.Constant(t.name + "_neg", -np.asarray(t.values))
                    return PassResult(True, {"flipped": 1})
        return PassResult(False, {"flipped": 0})
'''


def readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- example: user-pass -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its worked pass example"
    return m.group(1)


@pytest.fixture(scope="module")
def user_pass_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("user") / "my_passes.py"
    p.write_text(readme_example())
    return p


def test_readme_pass_is_listed(user_pass_file):
    out = run_mmc("passes", "--pass-module", user_pass_file).stdout
    assert re.search(r"square-to-mul\s+rewrite Pow\(x, 2\) as Mul\(x, x\)", out)


def test_readme_pass_runs_in_the_pipeline(user_pass_file, tiny_dir, engine_all, tmp_path):
    out, dump = tmp_path / "user.mmc", tmp_path / "dump"
    # before the norm fusion (which would take the Pow(x, 2) into mmc.RMSNorm first)
    pipeline = "fold-constants,canonicalize,cse,square-to-mul,dce"
    run_mmc("compile", tiny_dir, "--pass-module", user_pass_file, "--passes", pipeline,
            "--exporter", "torchscript", "--dump-dir", dump, "--verify-each", "-o", out, "-q")
    report = json.loads((dump / "report.json").read_text())
    hits = {r["component"]: r["rewrites"]["pow2"] for r in report["passes"] if r["name"] == "square-to-mul"}
    # one Pow(x, 2) per RMSNorm: decoder 2 layers x 2 + final norm; vision 4 blocks x 2 + merger
    assert hits == {"decoder": 5, "vision": 9}
    diff = run_mmc("diff", dump, "square-to-mul").stdout
    assert "+" in diff and "Mul(" in diff and "# by square-to-mul" in diff
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passes"] == pipeline.split(",")
    from mmc.runtime import load

    prompt = "Describe the quick brown fox."
    assert load(out).generate(prompt, max_new_tokens=8).token_ids == \
        load(engine_all).generate(prompt, max_new_tokens=8).token_ids


def test_verify_each_names_the_breaking_pass_and_loses_nothing(tiny_dir, engine_all, tmp_path):
    bad = tmp_path / "bad_pass.py"
    bad.write_text(BREAKING_PASS)
    out = tmp_path / "kept.mmc"
    import shutil

    shutil.copytree(engine_all, out)
    before = (out / "manifest.json").read_bytes()
    proc = run_mmc("compile", tiny_dir, "--pass-module", bad, "--passes", "flip-first-weight", "--verify-each",
                   "--exporter", "torchscript", "-o", out, "-q", check_ok=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pass 'flip-first-weight'" in lines[0] and "exceeds" in lines[0], proc.stderr
    assert (out / "manifest.json").read_bytes() == before  # the old engine is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_pass.py", "kept.mmc"]  # no partial folders


def test_pass_module_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    proc = run_mmc("passes", "--pass-module", broken, check_ok=False)
    assert proc.returncode == 2 and "failed to import" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_mmc("passes", "--pass-module", "no_such_module_xyz", check_ok=False)
    assert proc.returncode == 2 and "cannot be imported" in proc.stderr
