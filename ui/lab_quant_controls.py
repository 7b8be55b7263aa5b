"""Compression lab controls for quantization (issue 13): formats, mixed precision and the
LLM.int8 outlier split. Registered with `ui.lab_controls.method` like every other edit
family."""

from __future__ import annotations
