"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_mmc


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mmc: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def engine_copy(engine_all, tmp_path):
    dst = tmp_path / "copy.mmc"
    shutil.copytree(engine_all, dst)
    return dst


def run_engine(engine, *extra):
    return run_mmc("run", engine, "--prompt", "hi", "--max-new-tokens", 2, *extra, check_ok=False)


def test_corrupt_manifest(engine_copy):
    (engine_copy / "manifest.json").write_text("{not json")
    assert_one_line_error(run_engine(engine_copy), "corrupt")


def test_corrupt_graph_bytes(engine_copy):
    graph = engine_copy / "graphs" / "decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert_one_line_error(run_engine(engine_copy), "checksum")


def test_newer_format(engine_copy):
    m = json.loads((engine_copy / "manifest.json").read_text())
    m["format_version"] = 999
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run_engine(engine_copy), "newer", "upgrade")


def test_missing_weight_file(engine_copy):
    (engine_copy / "graphs" / "decoder.onnx.data").unlink()
    assert_one_line_error(run_engine(engine_copy), "missing")


def test_weight_path_escaping_the_engine(engine_copy):
    m = json.loads((engine_copy / "manifest.json").read_text())
    m["host_weights"] = "../../etc/passwd"
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run_engine(engine_copy), "outside")


def test_not_an_engine(tmp_path):
    assert_one_line_error(run_engine(tmp_path), "not an mmc engine")
    assert_one_line_error(run_engine(tmp_path / "nope.mmc"), "does not exist")


def test_unreadable_image(engine_all, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    assert_one_line_error(run_engine(engine_all, "--image", bad), "cannot be decoded")
    assert_one_line_error(run_engine(engine_all, "--image", tmp_path / "absent.jpg"), "does not exist")


def test_unknown_preset(tmp_path):
    assert_one_line_error(run_mmc("compile", "no-such-model", "-o", tmp_path / "x.mmc", check_ok=False),
                          "unknown model or preset")
    assert not (tmp_path / "x.mmc").exists()


def test_checkpoint_without_weights(tiny_dir, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    assert_one_line_error(run_mmc("compile", broken, "-o", tmp_path / "x.mmc", check_ok=False), "safetensors")


def test_bad_flags(engine_all, tmp_path):
    assert_one_line_error(run_mmc("compile", "--passes", "all,nope", "-o", tmp_path / "x.mmc", check_ok=False),
                          "unknown pass 'nope'")
    assert_one_line_error(run_engine(engine_all, "--temperature", "0", "--do-sample"), "temperature")
    proc = run_mmc("compile", "--target", "nope", check_ok=False)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def test_debug_shows_traceback(engine_copy):
    (engine_copy / "manifest.json").write_text("{not json")
    proc = run_mmc("--debug", "run", engine_copy, "--prompt", "hi", check_ok=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("breakage", ["no-host", "graph-not-str", "version-zero", "version-bool", "unlisted-file"])
def test_malformed_manifest_is_corrupt_not_internal(engine_copy, breakage):
    m = json.loads((engine_copy / "manifest.json").read_text())
    if breakage == "no-host":
        del m["host"]
    elif breakage == "graph-not-str":
        m["components"]["vision"]["graph"] = ["x"]
    elif breakage == "version-zero":
        m["format_version"] = 0
    elif breakage == "version-bool":
        m["format_version"] = True
    else:
        (engine_copy / "assets" / "extra.json").write_text("{}")
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run_engine(engine_copy), "corrupt")


def test_bad_prompts_images_and_seeds(engine_all, tmp_path):
    from PIL import Image

    assert_one_line_error(run_mmc("run", engine_all, "--prompt", "<|image_pad|>", check_ok=False), "reserved token")
    thin = tmp_path / "thin.png"
    Image.new("RGB", (300, 1)).save(thin)
    assert_one_line_error(run_engine(engine_all, "--image", thin), "processor")
    assert_one_line_error(run_engine(engine_all, "--image", tmp_path), "directory")
    assert_one_line_error(run_engine(engine_all, "--do-sample", "--seed", "-1"), "seed")


def test_bad_checkpoints_fail_at_compile(tiny_dir, tmp_path):
    broken = tmp_path / "trunc"
    shutil.copytree(tiny_dir, broken)
    w = next(broken.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    assert_one_line_error(run_mmc("compile", broken, "-o", tmp_path / "a.mmc", check_ok=False), "cannot load")
    notok = tmp_path / "notok"
    shutil.copytree(tiny_dir, notok)
    (notok / "tokenizer.json").unlink()
    (notok / "tokenizer_config.json").unlink()
    assert_one_line_error(run_mmc("compile", notok, "--exporter", "torchscript", "-o", tmp_path / "b.mmc",
                                  check_ok=False), "tokenizer")
    assert not (tmp_path / "b.mmc").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(run_mmc("compile", tiny_dir, "-o", afile / "x.mmc", check_ok=False), "is a file")
