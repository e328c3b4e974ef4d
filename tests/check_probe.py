"""Run under torchrun by tests/test_check_dist.py: counts this process's dataset checks and records
which filtered copy it read, then writes ``OUT/rank<R>.json``.

    python check_probe.py OUT train <trainer.run arguments>   # a real (1-iteration) training run
    python check_probe.py OUT check ANN IMAGES_DIR            # only the loader's call, under gloo
"""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the working tree's packages, as `python -m` would use

from dali_scp import check as check_mod  # noqa: E402

out, mode, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
record = dict(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]), checks=0, read=None,
              error=None)
real_check = check_mod.check


def counting_check(*a, **kw):
    record["checks"] += 1
    return real_check(*a, **kw)


def remember(path):
    record["read"] = dict(path=str(path), sha1=hashlib.sha1(Path(path).read_bytes()).hexdigest())


check_mod.check = counting_check
try:
    if mode == "train":
        import pipelines.iterator as iterator
        real = iterator.checked_annotations

        def recording(*a, **kw):
            path, rep = real(*a, **kw)
            remember(path)
            return path, rep
        iterator.checked_annotations = recording
        from trainer import run
        rc = run.main(args)
        assert rc == 0, rc
    else:
        from trainer import distributed
        d = distributed.init("cpu")
        try:
            path, _ = check_mod.checked_annotations(args[0], args[1], progress=False)
            remember(path)
        except ValueError as e:
            record["error"] = str(e)
        distributed.cleanup(d)
finally:
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
