"""Compression lab controls for early exits (issue 14): criterion, threshold and lens, with
the trade-off curve of every criterion and the prompt's tokens coloured by exit layer.
Registered with `ui.lab_controls.method` like every other edit family."""

from __future__ import annotations
