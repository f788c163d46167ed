"""Exported graphs reproduce torch (fp32) at shapes other than the traced ones, with both
exporters: decoder logits and present K/V within 1e-5 (absolute), vision embeddings vs
transformers' own vision tower (with its windowed per-chunk attention) within 1e-5 relative to
their largest magnitude."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmc.models import decoder_export as de
from mmc.models.qwen2_5_vl import export_graphs as eg
from mmc.numerics import run_model


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    from mmc.models import resolve

    return resolve(tiny_dir)[1]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exported_graphs_match_torch(exporter, adapter, hf_model, tmp_path):
    import onnx

    meta = adapter.host_metadata()
    rng = np.random.default_rng(1)
    dec = onnx.load(str(eg.export_decoder(hf_model, tmp_path / "decoder.onnx", exporter, meta)))
    wrapper = de.make_cached_decoder(hf_model.model.language_model, hf_model.lm_head, meta["num_layers"])
    names, outs = de.decoder_io(meta["num_layers"])
    table = hf_model.model.language_model.embed_tokens.weight.detach().numpy()
    for b, s, p in [(1, 7, 0), (3, 1, 9), (2, 5, 2), (2, 4, 3)]:  # traced at (2, 3, 4)
        feeds = de.decoder_arrays(meta, b, s, p, rng)
        if (b, s, p) == (2, 4, 3):
            feeds["attention_mask"][1, :2] = 0  # left padding: row 1's first two cache slots are masked
        feeds["inputs_embeds"] = table[rng.integers(0, len(table), (b, s))]  # what the runtime feeds
        for n in names[3:]:
            feeds[n] *= 0.5  # K/V at the scale this model's layers produce
        got = run_model(dec, feeds)
        with torch.no_grad():
            ref = wrapper(*(torch.from_numpy(feeds[n]) for n in names))
        for name, r in zip(outs, ref):
            assert got[name].shape == tuple(r.shape)
            assert np.abs(got[name] - r.numpy()).max() <= 1e-5, (name, b, s, p)

    vis = onnx.load(str(eg.export_vision(hf_model, tmp_path / "vision.onnx", exporter, meta)))
    for grids in ([[1, 12, 18]], [[1, 6, 10], [2, 4, 6], [1, 16, 16]]):  # traced at [[1,8,12],[1,4,4]]
        feeds = eg.vision_arrays(meta, grids, rng)
        got = run_model(vis, feeds)["image_embeds"]
        with torch.no_grad():
            ref = hf_model.model.visual(torch.from_numpy(feeds["pixel_values"]),
                                        grid_thw=torch.tensor(grids)).pooler_output.numpy()
        assert got.shape == ref.shape
        # embeddings reach |x| ~ 10 here: 1e-5 relative to the largest, i.e. a few fp32 ulps
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), grids
