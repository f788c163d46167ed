"""The README's first command works as written on the embedded default, and the inspection
commands (`inspect`, `diff`, report.json) show what they promise."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import run_mmc

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_compiles_and_runs_the_default(tmp_path):
    text = README.read_text()
    cmd = re.search(r"```bash\npip install torch==2.13.0 && pip install -e \. && (mmc compile.*)\n```", text)
    assert cmd, "README quick-start command changed; update this test with it"
    compile_part, run_part = cmd.group(1).split(" && ")
    assert compile_part == "mmc compile"
    run_mmc("compile", "-q", cwd=tmp_path)  # no MODEL: the embedded tiny preset
    engine = tmp_path / "tiny-qwen2.5-vl.mmc"
    assert (engine / "manifest.json").is_file()
    args = re.findall(r"\"[^\"]*\"|\S+", run_part)[1:]
    proc = run_mmc(*[a.strip('"') for a in args], cwd=tmp_path)
    assert proc.stdout.strip(), "mmc run printed nothing"
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["source"]["id"] == "preset:tiny-qwen2.5-vl"
    from mmc.registry import resolve_pipeline

    assert manifest["passes"] == resolve_pipeline("all")
    assert manifest["passes"][:3] == ["fold-constants", "canonicalize", "cse"] and manifest["passes"][-1] == "dce"


def test_help_reads_well():
    out = run_mmc("--help").stdout
    for cmd in ("compile", "passes", "diff", "inspect", "run"):
        assert re.search(rf"^\s+{cmd}\s+\w", out, re.M), cmd
    comp = run_mmc("compile", "--help").stdout
    assert "tiny-qwen2.5-vl" in comp and "qwen2.5-vl-7b" in comp and "RANDOM weights" in comp


def test_inspect_shows_manifest_and_verifies(engine_all):
    out = run_mmc("inspect", engine_all).stdout
    assert "checksums ok" in out and "component   vision" in out and "component   decoder" in out
    assert "pixel_values" in out and "KV-cache tensors" in out
    m = json.loads(run_mmc("inspect", engine_all, "--json").stdout)
    assert m["format_version"] == 1 and m["target"] == "ort" and m["quantization"] is None
    dec = m["components"]["decoder"]
    assert [i["name"] for i in dec["inputs"][:3]] == ["inputs_embeds", "position_ids", "attention_mask"]
    assert dec["inputs"][0]["shape"][:2] == ["batch", "seq"]


def test_report_and_diff(engine_all):
    dump = engine_all.parent / "dump-all"
    report = json.loads((dump / "report.json").read_text())
    rec = report["passes"][0]
    for key in ("name", "rewrites", "nodes_before", "nodes_after", "op_delta", "seconds", "check"):
        assert key in rec
    assert set(rec["check"]) >= {"max_abs_err", "within_tolerance"}
    files = sorted(p.name for p in (dump / "decoder").iterdir())
    from mmc.registry import resolve_pipeline

    assert files == ["00-export.txt"] + [f"{i:02d}-{p}.txt" for i, p in enumerate(resolve_pipeline("all"), start=1)]
    first = (dump / "decoder" / "00-export.txt").read_text().splitlines()
    assert first[0].startswith("graph ") and any("input  %inputs_embeds" in line for line in first)
    assert all("# by " in line for line in first if " = " in line)
    changed = [r for r in report["passes"] if r["nodes_before"] != r["nodes_after"]]
    out = run_mmc("diff", dump).stdout
    assert changed and out.startswith("---")
    assert run_mmc("diff", dump, "no-such-pass", check_ok=False).returncode == 2
