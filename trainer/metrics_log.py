"""Three views of one stream of training metrics: readable log lines, JSON lines (``metrics.jsonl``)
for scripts, and TensorBoard events (``tb/``). Only rank 0 writes."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("trainer")


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.f = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception as e:  # tensorboard missing: logs and JSON lines still work
                log.warning("TensorBoard events disabled (%s)", e)

    def write(self, it: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        rec = dict(iter=it, time=time.time(), **{k: float(v) for k, v in metrics.items()})
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), it)

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
