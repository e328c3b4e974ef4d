"""Plants an exception in a custom pipeline stage and reads what the user gets, in a child process
(on the GPU, before the stages caught their exceptions, DALI ended the process with a segmentation
fault: a test in-process would take the whole session down with it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
import pipelines.stages as st
from dali_scp.dataset import resolve
from pipelines.iterator import CocoLoader

root, device, stage = sys.argv[1:4]
def planted(*a, **k):
    raise ValueError("planted failure")
if stage == "masks":
    st.rasterize_packed_batch = planted
else:
    st.copy_paste_packed = st.copy_paste_packed_batched = planted
loader = CocoLoader("ssj_scp", resolve(root, "train2017"), batch_size=4, device=device, infinite=True,
                    out_size=256)
try:
    next(iter(loader))
except st.StageFailed as e:
    print("CAUGHT", e)
    raise SystemExit(0)
print("NO ERROR: the batch came back")
raise SystemExit(3)
"""


def run_probe(root, device: str, stage: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", CHILD, str(root), device, stage], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
