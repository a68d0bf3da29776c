"""`looptrace featurize` under torchrun, logging which shards this rank wrote (tests/test_store.py).

Each rank appends ``[checkpoint, role, start, stop]`` of every shard it writes to ``$PROBE_LOG.<rank>``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from looptrace.cli import main
from looptrace.store.store import FeatureStore

_write = FeatureStore.write_shard


def _logged(self: FeatureStore, ck: int, role: str, start: int, stop: int, *args: Any, **kwargs: Any) -> Any:
    with open(f"{os.environ['PROBE_LOG']}.{os.environ['RANK']}", "a") as f:
        f.write(json.dumps([ck, role, start, stop]) + "\n")
    return _write(self, ck, role, start, stop, *args, **kwargs)


FeatureStore.write_shard = _logged  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
