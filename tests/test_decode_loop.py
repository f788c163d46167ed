"""The decode loop feeds the decoder exactly one new token per sequence per step, with the KV
cache of all earlier positions fed back (the prompt is never re-run)."""

from __future__ import annotations

from mmc.runtime import load


def test_each_decode_step_feeds_one_token(engine_all, images):
    engine = load(engine_all)
    calls = []
    real_run = engine.decoder.run

    def spy(host_inputs, device_inputs=None, host_outputs=()):
        past = (device_inputs or {}).get("past_key_0", host_inputs.get("past_key_0"))
        past_len = past.shape()[2] if callable(getattr(past, "shape", None)) else past.shape[2]
        calls.append((host_inputs["inputs_embeds"].shape, past_len, host_inputs["attention_mask"].shape))
        return real_run(host_inputs, device_inputs, host_outputs)

    engine.decoder.run = spy
    prompts = ["What is in the picture?", "Describe the quick brown fox."]
    results = engine.generate(prompts, images=[[images["odd"]], []], max_new_tokens=6)
    steps = max(len(r.token_ids) for r in results)
    assert len(calls) == steps  # one prefill + (steps - 1) decode calls, the last token needs no call
    (b, s, _), past0, _ = calls[0]
    assert b == 2 and s > 10 and past0 == 0  # prefill: whole prompt, empty cache
    for i, ((b, s, _), past_len, mask) in enumerate(calls[1:], start=1):
        assert (b, s) == (2, 1)  # one new token per sequence
        assert past_len == calls[0][0][1] + i - 1  # cache holds prompt + earlier tokens
        assert mask == (2, past_len + 1)
