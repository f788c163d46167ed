"""Maintenance and benchmark scripts (run as `python -m mmc.tools.<name>` or `python tools/<name>.py`)."""
