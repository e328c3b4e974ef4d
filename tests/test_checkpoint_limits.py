"""A crafted checkpoint cannot make the reader (or what builds a model from its numbers) take more memory or
time than a small multiple of its own size, nor crash the process: each file below, modelled on a
reproducer of the reader's security review, is refused in one line, in milliseconds.

The files are read in one child process with its address space capped at what it had after the imports plus
HEADROOM and a timeout, so that a regression fails here (MemoryError in place of the refusal, a segfault,
a timeout) instead of taking the machine down: unbounded, each of these asks for one to several GiB or
tens of seconds of CPU (measured on the reader before the fix: 1,064 bytes -> 3 x 400 MB, 673 bytes ->
1 GiB, 286 KB -> 1 GB, 67 KB -> 700 MB, 340-570 bytes -> 20 s and 1.2 GB, 300 KB -> SIGSEGV).
"""
import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from checkpoint_files import G, I, P2, R, S, T, legacy_file, patch_entry, pid, tensor, zip_file

ROOT = Path(__file__).resolve().parents[1]
HEADROOM = 512 << 20   # address space the child may add to what its imports took
CPU_SECONDS = 5        # per file; a refusal takes milliseconds, the unbounded cases tens of seconds

CHILD = r"""
import json, os, resource, sys, time
from trainer import checkpoint_reader as cr
cases = json.loads(sys.argv[1])
if any(kind == "model" for _, kind, _ in cases):
    from trainer.evaluate import load_model_from_checkpoint
statm = open("/proc/self/statm").read().split()
limit = int(statm[0]) * os.sysconf("SC_PAGE_SIZE") + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for name, kind, path in cases:
    print(json.dumps(dict(start=name)), flush=True)
    t = time.process_time()
    try:
        if kind == "read":
            out = dict(ok=type(cr.read(path).obj).__name__)
        else:
            load_model_from_checkpoint(path)
            out = dict(ok="model")
    except cr.CheckpointError as e:
        out = dict(error=str(e))
    except BaseException as e:
        out = dict(uncaught=f"{type(e).__name__}: {str(e)[:300]}")
    out.update(name=name, cpu=round(time.process_time() - t, 3))
    print(json.dumps(out), flush=True)
"""


# ------------------------------------------------------------------ the files
CASES: dict = {}  # name -> (build(dir) -> path, what the one-line message must say, "read" or "model")


def case(name, expect, kind="read"):
    def register(build):
        CASES[name] = (build, expect, kind)
        return build
    return register


def _one_float(shape):
    """A tensor of ``shape``, all strides 0, over a storage of one float: legal, and prod(shape) elements."""
    return tensor(pid("0", 1), 0, shape, (0,) * len(shape))


ONE = {"0": b"\0\0\x80\x3f"}
BUDGET = "would make the read create more than 2x the file's size"
BIG = b"B" + (256 << 10).to_bytes(4, "little") + b"\0" * (256 << 10)  # BINBYTES of 256 KiB


def _laughs(depth, width=10, pop=False):
    """A list of ``width`` references to a list of ``width`` references ... ``depth`` levels: O(depth x width)
    bytes, width ** depth elements to whoever walks it. ``pop``: only the top list stays on the stack."""
    out = b"]q\x00"
    for k in range(1, depth + 1):
        out += (b"0" if pop else b"") + b"(" + (b"h" + bytes([k - 1])) * width + b"lq" + bytes([k])
    return out


def _deflate_bomb(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of spaces in about ``mib`` KB: one fully flushed block repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b" " * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def _memo_reuse(func: bytes, data: bytes, call: bytes, n: int) -> bytes:
    """``func`` and ``data`` in memo 0 and 1, then a list of ``n`` calls ``call`` made of them (2 bytes a use)."""
    return P2 + func + b"q\x00" + data + b"q\x01" + b"00" + b"(" + call * n + b"l."


# 1. zip records: the sizes in the central directory checked against each other and the file
@case("zip record claims 1 GiB", "storages are larger than the file")
def _(d):
    p = zip_file(d / "claims.pth", P2 + b"}" + S("w") + tensor(pid("0", 1 << 28), 0, (1,), (1,)) + b"s.", {"0": b"\0" * 4})
    patch_entry(p, "archive/data/0", csize=1 << 30, usize=1 << 30)
    return p


@case("3 zip records claim 400 MB each", "storages are larger than the file")
def _(d):
    m = 400 << 20
    p = zip_file(d / "claims3.pth", P2 + b"(" + b"".join(tensor(pid(str(k), m, "ByteStorage"), 0, (m,), (1,))
                                                        for k in range(3)) + b"l.", {str(k): b"\0" for k in range(3)})
    for k in range(3):
        patch_entry(p, f"archive/data/{k}", usize=m)
    return p


@case("a record shorter than its claim", "record of 16 bytes (4 stored)")
def _(d):
    p = zip_file(d / "short.pth", P2 + tensor(pid("0", 4), 0, (4,), (1,)) + b".", {"0": b"\0" * 4})
    patch_entry(p, "archive/data/0", usize=16)
    return p


# 2. the byteorder record: stored and at most 16 bytes, never decompressed
@case("byteorder record: 1 GiB deflate bomb", "byteorder record is 1073741824 bytes")
def _(d):
    p = zip_file(d / "bomb.pth", P2 + b"}.", byteorder=_deflate_bomb(1024))
    patch_entry(p, "archive/byteorder", method=zipfile.ZIP_DEFLATED, usize=1 << 30)
    return p


@case("byteorder record compressed", "byteorder record is compressed")
def _(d):
    p = zip_file(d / "deflated.pth", P2 + b"}.", byteorder=zlib.compress(b"little")[2:-4])
    patch_entry(p, "archive/byteorder", method=zipfile.ZIP_DEFLATED, usize=6)
    return p


# 3. tensors whose strides repeat one stored element: copied within the budget, or refused
@case("expanded tensor converted to float64", "an expanded tensor would make the read create more than")
def _(d):
    return zip_file(d / "s0_to.pth", P2 + R(G("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"),
                                            _one_float((1 << 27,)), G("torch", "float64"), S("cpu"), b"\x89") + b".", ONE)


@case("expanded tensor as defaultdict items", "an expanded tensor")
def _(d):
    return zip_file(d / "s0_dd.pth", P2 + R(G("collections", "defaultdict"), b"N", _one_float((200_000, 2))) + b".", ONE)


@case("NEWOBJ with a tensor as arguments", "arguments that are not a tuple")
def _(d):
    return zip_file(d / "newobj.pth", P2 + G("foo", "Bar") + tensor(pid("0", 1), 0, (1,), (1,)) + b"\x81.", ONE)


@case("__newobj_ex__ with a tensor as arguments", "arguments that are not a tuple")
def _(d):
    return zip_file(d / "newobj_ex.pth", P2 + R(G("copyreg", "__newobj_ex__"), G("foo", "Bar"),
                                                tensor(pid("0", 1), 0, (1,), (1,)), b"}") + b".", ONE)


# 4. copies of one big object reused through the memo
@case("bytearray(256 KiB) x 4000", BUDGET)
def _(d):
    return zip_file(d / "quad_bytearray.pth", _memo_reuse(G("builtins", "bytearray"), BIG, b"h\x00h\x01\x85R", 4000))


@case("NumPy _frombuffer(256 KiB) x 4000", BUDGET)
def _(d):
    dtype = R(G("numpy", "dtype"), S("u1"), b"\x89", b"\x88") + T(I(3), S("|"), b"N", b"N", b"N", I(-1), I(-1), I(0)) + b"b"
    return zip_file(d / "quad_frombuffer.pth", P2 + G("numpy.core.numeric", "_frombuffer") + b"q\x00" + BIG + b"q\x01"
                    + dtype + b"q\x02" + T(I(256 << 10)) + b"q\x03" + b"0000("
                    + (b"h\x00(h\x01h\x02h\x03" + S("C") + b"tR") * 4000 + b"l.")


@case("OrderedDict(50k pairs) x 4000", BUDGET)
def _(d):
    pairs = b"((" + b"K\x00K\x00\x86" * 50_000 + b"l\x85"  # ([(0, 0)] * 50k,)
    return zip_file(d / "quad_odict.pth", _memo_reuse(G("collections", "OrderedDict"), pairs, b"h\x00h\x01R", 4000))


@case("NEWOBJ(list of 100k) x 4000", "a call's arguments " + BUDGET)
def _(d):
    return zip_file(d / "quad_newobj.pth", _memo_reuse(G("foo", "Bar"), b"(" + b"N" * 100_000 + b"l", b"h\x00h\x01\x81", 4000))


# 5. inert names grown by chained getattr
@case("getattr chain of 64 KiB names", "more than 256 characters")
def _(d):
    chain = P2 + G("builtins", "getattr") + b"q\x00" + S("a" * (64 << 10)) + b"q\x01" + b"00" + G("x", "Y") + b"q\x020"
    return zip_file(d / "getattr.pth", chain + b"h\x00(h\x02h\x01tRq\x020" * 150 + b"h\x02.")


# 6. values the file shares with itself (10 ** 8 elements) reaching a message
@case("laughs as the legacy protocol number", "torch legacy format of protocol a list")
def _(d):
    return legacy_file(d / "laughs_head.pth", P2 + b"}.", protocol_pkl=P2 + _laughs(8) + b".")


@case("laughs as the legacy storage keys", "its list of storages does not match")
def _(d):
    return legacy_file(d / "laughs_keys.pth", P2 + b"}.", keys_pkl=P2 + b"(" + _laughs(8) + b"l.")


@case("laughs as a persistent id", "a persistent id a list")
def _(d):
    return zip_file(d / "laughs_pid.pth", P2 + b"(" + _laughs(8, pop=True) + b"tQ.")


@case("laughs called", "its pickle calls a list")
def _(d):
    return zip_file(d / "laughs_call.pth", P2 + _laughs(8) + b")R.")


@case("laughs as a NumPy dtype name", "NumPy dtype a list")
def _(d):
    return zip_file(d / "laughs_dtype.pth", P2 + G("numpy", "dtype") + b"(" + _laughs(8, pop=True) + b"tR.")


# 7. keys whose hash recurses (CPython's tuple hash has no depth guard) or repeats
@case("dict key: tuple 300k deep", "a dict key or set item of type tuple")
def _(d):
    return zip_file(d / "deep_key.pth", P2 + b"})" + b"\x85" * 300_000 + b"Ns.")


@case("set item: tuple 300k deep", "a dict key or set item of type tuple")
def _(d):
    return zip_file(d / "deep_item.pth", P2 + G("builtins", "set") + b"(()" + b"\x85" * 300_000 + b"ltR.")


@case("dict key: tuple laughs, 10 ** 8 hashes", "a dict key or set item of type tuple")
def _(d):
    laughs = b")q\x00" + b"".join(b"0(" + (b"h" + bytes([k - 1])) * 10 + b"tq" + bytes([k]) for k in range(1, 9))
    return zip_file(d / "laughs_key.pth", P2 + b"}" + laughs + b"Ns.")


@case("5000 tuple keys", "more than 4096 dict keys or set items that are tuples")
def _(d):
    return zip_file(d / "tuple_keys.pth", P2 + b"}(" + b"".join(I(i) + b"\x85N" for i in range(5000)) + b"u.")


@case("lists 200 deep", "nests more than 100 containers deep")
def _(d):
    return zip_file(d / "deep_list.pth", P2 + b"]" + b"\x85" * 199 + b".")


# downstream: a model built from the numbers a file gives
def _demo_checkpoint(path, **recipe):
    from dali_scp.presets import RECIPES
    from trainer.model import build_model
    demo = RECIPES["demo"]
    torch.save(dict(model=build_model(demo, 3).state_dict(), recipe=dict(demo.as_dict(), **recipe), num_classes=3), path)
    return path


@case("num_classes 10 ** 9", "class count 1000000000 is not an integer in [2, 100000]", "model")
def _(d):
    p = _demo_checkpoint(d / "classes.pth")
    state = torch.load(p, weights_only=True)
    torch.save(dict(state, num_classes=10 ** 9), p)
    return p


@case("recipe of a 4096-wide ResNet-50 over a demo model", "checkpoint does not match the model built from its recipe",
      "model")
def _(d):
    return _demo_checkpoint(d / "wide.pth", backbone="resnet50", backbone_width=4096)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("crafted")
    cases = [(name, kind, str(build(d))) for name, (build, _, kind) in CASES.items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases), str(HEADROOM)], capture_output=True,
                       text=True, env=env, timeout=300)
    got, started = {}, None
    for line in p.stdout.splitlines():
        r = json.loads(line)
        if "start" in r:
            started = r["start"]
        else:
            got[r["name"]] = r
    return got, (p.returncode, started, p.stderr[-500:])


@pytest.mark.parametrize("name", list(CASES))
def test_crafted_file_is_refused_in_one_line_quickly(results, name):
    got, (rc, started, stderr) = results
    r = got.get(name)
    assert r is not None, f"the child died (status {rc}) reading {started!r}: {stderr}"
    assert "uncaught" not in r and "ok" not in r, r
    msg = r["error"]
    assert "\n" not in msg and "\x1b" not in msg and CASES[name][1] in msg, msg
    assert "MemoryError" not in msg and r["cpu"] < CPU_SECONDS, r
