"""One format for every id edgeloop makes (runs, ensembles, model versions): ``YYYYmmddTHHMMSS-<hex8>``.

Sorting ids sorts them by creation time (UTC); the suffix is a content digest where there is content
to name, else random, so two ids made in the same second differ.
"""

from __future__ import annotations

import time
import uuid


def new_id(digest: str | None = None, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{(digest or uuid.uuid4().hex)[:8]}"
