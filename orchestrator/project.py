"""Where this checkout lives: the source of the wheel that provisioning ships, and the demo's defaults."""

from __future__ import annotations

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
