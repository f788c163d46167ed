"""Qwen2.5-VL: export wrappers, adapter and presets."""
