"""Runtime settings for one test: `set_runtime(monkeypatch, compile="0")` changes the settings in
force (lib.cim.runtime) until the test ends, when monkeypatch puts the earlier ones back."""
from __future__ import annotations

import dataclasses

from lib.cim.runtime import RUNTIME


def set_runtime(monkeypatch, **changes) -> None:
    monkeypatch.setattr(RUNTIME, "_current", dataclasses.replace(RUNTIME.current, **changes))
