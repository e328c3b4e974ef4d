"""The checkpoint reader (``trainer.checkpoint_reader``): real files from mmdetection's and torchvision's own
tooling read as those tools read them and import; crafted files never run anything, through every command
that reads checkpoints; every refusal is one plain line.

``tests/data/checkpoints/`` was written by ``scripts/mmdet_checkpoints.py`` (mmdet 3.3 / mmengine 0.10 Runner
and publish_model, mmcv 1.7's runner, torchvision), with ``reference.json``: what those files hold as the
writing side's own ``torch.load(weights_only=False)`` read them.
"""
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import pickle_gadgets
from checkpoint_files import P2, G, S, legacy_file, legacy_storage, pid, tensor, tensor_pickle, zip_file
from messages import one_plain_line
from reference_files import reference_script
from trainer import checkpoint as ckpt
from trainer import checkpoint_reader as cr
from trainer import import_weights

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "checkpoints"
REF = json.loads((DATA / "reference.json").read_text())
CLASSES = ["disc", "square", "triangle"]


SCRIPT = reference_script("mmdet_checkpoints")


# ------------------------------------------------------------------ real files
@pytest.mark.parametrize("name", sorted(REF))
def test_real_files_read_as_their_writers_read_them(name):
    got = cr.read(DATA / name)
    ref = REF[name]
    obj = got.obj
    sd = obj["state_dict"] if "state_dict" in obj else obj
    assert SCRIPT.digest(sd) == ref["state_dict_digest"] and len(sd) == ref["tensors"] == 432
    assert got.format == ("legacy" if "published" in name else "zip")
    if "keys" not in ref:  # the torchvision state dict: an OrderedDict with torch's _metadata
        assert type(obj) is OrderedDict and obj._metadata[""]["version"] == 1 and not got.inert
        return
    assert sorted(obj) == ref["keys"] and sorted(obj["meta"]) == ref["meta_keys"]
    meta = {k: v for k, v in obj["meta"].items() if k not in ("cfg", "config", "env_info")}
    assert SCRIPT.plain(meta) == ref["meta"]
    if "optimizer" in obj:
        state = obj["optimizer"]["state"]
        assert SCRIPT.digest({f"{i}.{k}": t for i, s in state.items() for k, t in s.items() if torch.is_tensor(t)}) \
            == ref["optimizer_state_digest"]
        assert SCRIPT.plain(obj["optimizer"]["param_groups"]) == ref["param_groups"]
    if "param_schedulers" in obj:
        assert SCRIPT.plain(obj["param_schedulers"]) == ref["param_schedulers"]
    if "message_hub" in obj:  # mmengine: HistoryBuffer objects kept inert, their NumPy arrays rebuilt exactly
        hub = obj["message_hub"]
        assert SCRIPT.plain({k: v for k, v in hub["runtime_info"].items() if k != "cfg"}) == ref["runtime_info"]
        assert isinstance(hub["runtime_info"]["eta"], np.float64)
        assert set(hub["log_scalars"]) == set(ref["history"]) and len(ref["history"]) >= 8
        for key, buf in hub["log_scalars"].items():
            assert isinstance(buf, cr.Inert) and buf.of == ref["history"][key]["type"]
            log, count = buf.state["_log_history"], buf.state["_count_history"]
            assert log.dtype == np.float64 and count.dtype == np.int64
            assert log.tolist() == ref["history"][key]["log"] and count.tolist() == ref["history"][key]["count"]
            assert buf.state["statistics_methods"]["mean"] == cr.InertGlobal(f"{buf.of}.mean")
        assert got.inert["mmengine.logging.history_buffer.HistoryBuffer"] == 1
    else:
        assert not got.inert
    if name.startswith("mmcv1"):
        assert obj["meta"]["mmcv_version"] == "1.7.2" and list(obj["meta"]["CLASSES"]) == CLASSES
        assert obj["meta"]["hook_msgs"]["last_ckpt"].endswith("epoch_1.pth")


def test_torch_weights_only_refuses_mmengines_file():
    """Why the reader exists: torch's own safe mode cannot read the file mmengine's Runner writes."""
    with pytest.raises(pickle.UnpicklingError):
        torch.load(DATA / "mmdet3_iter_2.pth", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(REF))
def test_real_files_import_and_the_model_runs(name, tmp_path):
    from trainer.evaluate import load_model_from_checkpoint
    from trainer.model import inference
    out, printed = tmp_path / "imported.pth", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert import_weights.main([str(DATA / name), "--out", str(out)]) == 0
    assert "432 tensors mapped, 0 unused, 0 missing; 3 classes" in printed.getvalue()
    state = ckpt.load(out)
    tv = name.startswith("torchvision")
    assert state["class_names"] == (None if tv else CLASSES)
    r = state["recipe"]
    assert (r["backbone_width"], r["fpn_channels"], r["head_channels"]) == (2, 16, 8)
    src = cr.read(DATA / name).obj
    src = src.get("state_dict", src)
    k = "backbone.body.layer4.2.conv3.weight"
    assert torch.equal(state["model"][k], src[k if tv else k.replace("backbone.body.", "backbone.")])
    model, _, _ = load_model_from_checkpoint(str(out))
    torch.manual_seed(0)
    with torch.no_grad():
        det = inference(model.eval(), [(torch.rand(3, 96, 128) * 255).to(torch.uint8)], [(96, 128)])[0]
    assert det["masks"].shape[1:] == (1, 96, 128) and len(det["boxes"]) <= 100


def test_raw_mmdetection_files_get_one_line_pointing_at_the_import(syn_root, tmp_path, capsys):
    from trainer import evaluate as ev
    from trainer import run as run_mod
    for name, what in (("mmdet3_iter_2.pth", "HistoryBuffer"), ("mmdet3_published.pth", "import_weights")):
        assert ev.main(["--checkpoint", str(DATA / name), "--coco-root", str(syn_root)]) == 2
        err = one_plain_line(capsys.readouterr().err)
        assert str(DATA / name) in err and what in err and "trainer.import_weights" in err
    common = ["--preset", "demo", "--coco-root", str(syn_root), "--no-eval", "--threads", "1", "--batch-size", "2",
              "--max-iters", "1"]
    assert run_mod.main(common + ["--out", str(tmp_path / "a"), "--init-from", str(DATA / "mmdet3_iter_2.pth")]) == 2
    assert "trainer.import_weights" in one_plain_line(capsys.readouterr().err)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ckpt_00000002.pth").write_bytes((DATA / "mmdet3_iter_2.pth").read_bytes())
    assert run_mod.main(common + ["--out", str(tmp_path / "b"), "--resume"]) == 2
    assert "HistoryBuffer" in one_plain_line(capsys.readouterr().err)


# ------------------------------------------------------------------ values of every kind, as torch reads them
def _values():
    base = torch.arange(24, dtype=torch.float32)
    sd = OrderedDict(w=torch.randn(3, 4), b=torch.zeros(0))
    sd._metadata = OrderedDict({"": {"version": 2}})
    return dict(
        view_a=base[2:10].view(2, 4), view_b=base[4:20:2], transposed=torch.randn(3, 5).t(),
        half=torch.randn(4).half(), bf16=torch.randn(4).bfloat16(), flags=torch.tensor([True, False]),
        int64=torch.tensor(2 ** 40), param=torch.nn.Parameter(torch.randn(2)), size=torch.Size([2, 3]),
        dtype=torch.float16, state_dict=sd,
        np_scalars=[np.float64(1.5), np.int64(-3), np.bool_(True), np.float32(2.25), np.str_("ab"), np.uint8(7)],
        np_arrays=[np.arange(6, dtype=np.uint32).reshape(2, 3), np.asfortranarray(np.random.rand(3, 2)),
                   np.array(3.5), np.zeros((0, 4), np.int16), np.array(["x", "yz"]), np.arange(4, dtype=">i4"),
                   np.array([1, None, "s"], dtype=object)],
        plain=dict(s={1, 2}, f=frozenset({"a"}), c=complex(1, 2), by=b"\x00\xff", ba=bytearray(b"ab"), t=(1, "x"),
                   sl=slice(1, 5, 2), none=None, nested=[[1, 2.5], {"k": "v"}]),
        rng=np.random.RandomState(3).get_state(),
        grad=torch.ones(2, requires_grad=True), expanded=torch.tensor([7.0]).expand(5, 3),
        defaultdicts=[defaultdict(list, a=[1]), defaultdict(int), defaultdict(None, b=2)],
        np_dtypes=[np.dtype("float32"), np.dtype(">f8"), np.dtype("U3"), np.dtype("int8")],
        layouts=[torch.strided, torch.sparse_coo],
    )


def _zip_only_values():
    """dtypes without a legacy storage class: torch writes them as torch.storage.UntypedStorage."""
    return {str(d): torch.arange(6).reshape(2, 3).to(d) for d in (torch.uint16, torch.uint32, torch.uint64,
                                                                   torch.float8_e4m3fn, torch.float8_e5m2)}


def _bits(t):
    """A tensor's contents as bytes (every dtype compares, NaN equals itself)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and type(a) is type(b) \
            and a.requires_grad == b.requires_grad and torch.equal(_bits(a), _bits(b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and \
            (a.tolist() == b.tolist())
    if isinstance(a, np.generic):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a) and \
            getattr(a, "default_factory", None) is getattr(b, "default_factory", None)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("how", ["zip", "legacy", "zip_protocol4", "legacy_protocol1"])
def test_every_kind_of_value_reads_as_torch_load_reads_it(tmp_path, how):
    torch.manual_seed(0)
    np.random.seed(0)
    legacy = how.startswith("legacy")
    v = _values() | ({} if legacy else _zip_only_values())
    f = tmp_path / "v.pth"
    torch.save(v, f, _use_new_zipfile_serialization=not legacy, pickle_protocol=int(how[-1]) if how[-1].isdigit() else 2)
    theirs = torch.load(f, map_location="cpu", weights_only=False)
    got = cr.read(f)
    mine = got.obj
    assert not got.inert and got.format == ("legacy" if legacy else "zip")
    for k in theirs:
        assert _equal(theirs[k], mine[k]), k
    assert mine["state_dict"]._metadata == theirs["state_dict"]._metadata
    assert mine["view_a"].untyped_storage().data_ptr() == mine["view_b"].untyped_storage().data_ptr()  # shared
    assert mine["transposed"].stride() == theirs["transposed"].stride()
    assert mine["np_arrays"][1].flags.f_contiguous and mine["np_arrays"][5].dtype.isnative  # NumPy's choice too
    assert theirs["expanded"].stride() == (0, 0) and mine["expanded"].is_contiguous()  # a copy: never 0-stride


def test_objects_of_other_classes_are_inert_not_refused(tmp_path):
    """pathlib paths, SimpleNamespace, functools.partial (of a builtin), argparse.Namespace in a checkpoint's
    meta: kept as inert data, the file's tensors read."""
    import argparse
    import functools
    import pathlib
    import types
    f = tmp_path / "meta.pth"
    torch.save(dict(w=torch.ones(2), meta=dict(p=pathlib.PosixPath("/data/x"), sn=types.SimpleNamespace(a=1),
                                               fn=functools.partial(max, 1), ns=argparse.Namespace(lr=0.1))), f)
    got = cr.read(f)
    meta = got.obj["meta"]
    assert torch.equal(got.obj["w"], torch.ones(2))
    assert {k: v.of for k, v in meta.items()} == dict(p="pathlib.PosixPath", sn="types.SimpleNamespace",
                                                      fn="functools.partial", ns="argparse.Namespace")
    assert meta["p"].args == ("/", "data", "x") and meta["sn"].state == {"a": 1} and meta["ns"].state == {"lr": 0.1}
    assert meta["fn"].args == (cr.InertGlobal("builtins.max"),) and meta["fn"].state[1] == (1,)


def test_legacy_storage_views_read_from_their_own_offset(tmp_path):
    """Files of before 2018 name views of a storage (key, offset, size): a tensor's offset and bounds are the
    view's, as torch.load reads them."""
    view = pid("root", 8, legacy=True, view=("v", 4, 4))
    data = legacy_storage(np.arange(8, dtype=np.float32).tobytes(), 8)
    f = legacy_file(tmp_path / "view.pth", P2 + tensor(view, 1, (3,), (1,)) + b".", ["root"], data)
    assert cr.read(f).obj.tolist() == torch.load(f, weights_only=True).tolist() == [5.0, 6.0, 7.0]
    outside = legacy_file(tmp_path / "outside.pth", P2 + tensor(view, 0, (8,), (1,)) + b".", ["root"], data)
    with pytest.raises(RuntimeError):
        torch.load(outside, weights_only=True)
    with pytest.raises(cr.Refused, match="outside its storage"):
        cr.read(outside)


def test_big_endian_files_swap_each_number_and_each_half_of_a_complex_one(tmp_path):
    values = dict(c=np.array([1 + 2j, 3 - 4j], ">c8"), d=np.array([1.5, -2], ">f8"), h=np.array([1, -2], ">i2"))
    kinds = dict(c="ComplexFloatStorage", d="DoubleStorage", h="ShortStorage")
    pkl = P2 + b"}" + b"".join(S(k) + tensor(pid(k, 2, kinds[k]), 0, (2,), (1,)) + b"s" for k in values) + b"."
    f = zip_file(tmp_path / "be.pth", pkl, {k: v.tobytes() for k, v in values.items()}, byteorder=b"big")
    theirs, mine = torch.load(f, weights_only=True), cr.read(f).obj
    for k, v in values.items():
        assert mine[k].tolist() == theirs[k].tolist() == v.tolist(), k


def test_previous_checkpoint_format_with_numpy_rng_state_still_loads(tmp_path):
    """Resumable runs from before the RNG state became plain data (an ndarray inside a tuple)."""
    torch.save(dict(iteration=3, ranks=[dict(rng=dict(numpy=np.random.RandomState(1).get_state()))]),
               tmp_path / "old.pth")
    st = ckpt.load(tmp_path / "old.pth")["ranks"][0]["rng"]["numpy"]
    assert st[1].dtype == np.uint32 and np.array_equal(st[1], np.random.RandomState(1).get_state()[1])


# ------------------------------------------------------------------ crafted files
def _payloads(m: str) -> dict:
    """name -> (pickle bytes, live?): live ones create ``m`` under a plain pickle load (checked below)."""
    system = P2 + G("posix", "system") + S(f"touch {m}") + b"\x85R."
    return {
        "os.system": (system, True),
        "builtins.exec": (P2 + G("__builtin__", "exec") + S(f"open({m!r}, 'w')") + b"\x85R.", True),
        "builtins.eval": (P2 + G("__builtin__", "eval") + S(f"__import__('pathlib').Path({m!r}).touch()") + b"\x85R.",
                          True),
        "subprocess.Popen": (P2 + G("subprocess", "Popen") + b"(" + S("touch") + S(m) + b"l\x85R.", True),
        "importlib.import_module": (P2 + G("__builtin__", "getattr") + G("importlib", "import_module") + S("os")
                                    + b"\x85R" + S("system") + b"\x86R" + S(f"touch {m}") + b"\x85R.", True),
        "getattr on a real object": (P2 + G("__builtin__", "getattr") + G("collections", "OrderedDict") + b")R"
                                     + S("__class__") + b"\x86R.", False),
        "__reduce__ to a module's function": (pickle.dumps(pickle_gadgets.Touch(m), protocol=2), True),
        "__setstate__ of a class": (pickle.dumps(pickle_gadgets.SetStateGadget(m), protocol=2), True),
        "BUILD planting __setstate__": (P2 + G("collections", "OrderedDict") + b")R" + b"}" + S("__setstate__")
                                        + G("pickle_gadgets", "touch") + b"s" + b"b" + S(m) + b"b.", True),
        "storage key holding a pickle": (tensor_pickle(system.decode("latin-1"), 1, 1), False),
        "storage key leaving the archive": (tensor_pickle("../../data.pkl", 1, 1), False),
        "tensor beyond its storage": (tensor_pickle("0", 4, 1000), False),
        "extension code": (P2 + b"\x82\x01.", False),
    }


INERT = {"__reduce__ to a module's function", "__setstate__ of a class"}  # read, kept inert; the rest refused
# the refusal each payload must meet (not merely some refusal before it)
REFUSAL = {"getattr on a real object": "attribute __class__", "BUILD planting __setstate__": "(BUILD)",
           "storage key holding a pickle": "not a plain key", "storage key leaving the archive": "not a plain key",
           "tensor beyond its storage": "outside its storage", "extension code": "extension codes"}
# the tensor payloads as each format writes a storage: (storage key, elements stored, tensor size)
TENSORS = {"storage key holding a pickle": (None, 1, 1), "storage key leaving the archive": ("../../data.pkl", 1, 1),
           "tensor beyond its storage": ("0", 4, 1000)}


def _crafted_file(path: Path, name: str, pkl: bytes, fmt: str, marker: Path) -> Path:
    if fmt == "zip":
        return zip_file(path, pkl, {"0": b"\0" * 16})
    if name not in TENSORS:
        return legacy_file(path, pkl)
    key, numel, size = TENSORS[name]
    key = key or (P2 + G("posix", "system") + S(f"touch {marker}") + b"\x85R.").decode("latin-1")
    return legacy_file(path, P2 + tensor(pid(key, numel, legacy=True), 0, (size,), (1,)) + b".", keys=[key],
                       data=legacy_storage(b"\0" * 4 * numel, numel))


def test_the_crafted_payloads_are_live(tmp_path):
    """Control: a plain pickle load of each live payload does create its marker (so the tests below, where
    the marker never appears, test the reader and not a dud)."""
    live = [p for p, is_live in _payloads(str(tmp_path / "MARKER")).values() if is_live]
    code = ("import pickle, sys\nfor i, p in enumerate(pickle.loads(sys.stdin.buffer.read())):\n"
            "    try: pickle.loads(p.replace(b'MARKER', b'mark%02d' % i))\n    except Exception: pass\n")
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(live), check=True, cwd=tmp_path,
                   env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")), timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mark{i:02d}" for i in range(len(live))]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("name", list(_payloads("m")))
def test_crafted_files_never_run_anything(tmp_path, name, fmt):
    marker = tmp_path / "marker"
    pkl, _ = _payloads(str(marker))[name]
    f = _crafted_file(tmp_path / "evil.pth", name, pkl, fmt, marker)
    if name in INERT:
        got = cr.read(f)
        assert isinstance(got.obj, cr.Inert) and got.obj.of.startswith("pickle_gadgets.") and got.inert
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.load(f)  # a dali-scp checkpoint never holds such objects
    else:
        with pytest.raises(cr.CheckpointError) as e:
            cr.read(f)
    assert not marker.exists(), "the payload ran"
    msg = one_plain_line(str(e.value))
    assert msg.startswith(str(f)), msg
    if name in ("os.system", "builtins.exec", "builtins.eval", "subprocess.Popen", "importlib.import_module"):
        assert "refused" in msg and name.split(".")[-1] in msg
    elif name in INERT:
        assert "inert" in msg and "pickle_gadgets." in msg
    else:
        assert REFUSAL[name] in msg, msg


def test_a_storage_record_holding_a_pickle_is_read_as_numbers(tmp_path):
    marker = tmp_path / "marker"
    payload = P2 + G("posix", "system") + S(f"touch {marker}") + b"\x85R."
    payload += b"." * (-len(payload) % 4)
    f = zip_file(tmp_path / "f.pth", tensor_pickle("0", len(payload) // 4, len(payload) // 4), {"0": payload})
    t = cr.read(f).obj
    assert t.dtype == torch.float32 and t.numpy().tobytes() == payload and not marker.exists()


def test_legacy_module_source_and_oversized_storages_are_refused(tmp_path):
    module = P2 + b"(" + S("module") + G("pickle_gadgets", "SetStateGadget") + S("x.py") + S("source") + b"tQ."
    with pytest.raises(cr.Refused, match="not a storage"):
        cr.read(legacy_file(tmp_path / "m.pth", module))
    huge = (P2 + b"(" + S("storage") + G("torch", "FloatStorage") + S("0") + S("cpu")
            + b"\x8a\x06" + (10 ** 12).to_bytes(6, "little") + b"NtQ.")
    with pytest.raises(cr.CheckpointError, match="larger than the file"):
        cr.read(legacy_file(tmp_path / "h.pth", huge, ["0"]))


def test_names_from_the_file_cannot_break_the_line(tmp_path):
    pkl = P2 + G("os", "system\x1b[1m\rX") + S("x") + b"\x85R."
    with pytest.raises(cr.Refused) as e:
        cr.read(zip_file(tmp_path / "f.pth", pkl))
    msg = one_plain_line(str(e.value))
    assert "\r" not in msg and "\\x1b" in msg


@pytest.mark.parametrize("data", [b"", b"junk" * 10, b"PK\x03\x04" + b"\0" * 40])
def test_files_that_are_not_checkpoints_get_one_line(tmp_path, data):
    (tmp_path / "x.pth").write_bytes(data)
    with pytest.raises(cr.CheckpointError) as e:
        cr.read(tmp_path / "x.pth")
    assert one_plain_line(str(e.value)).startswith(str(tmp_path / "x.pth"))


def test_every_command_that_reads_checkpoints_refuses_in_one_line(syn_root, tmp_path, capsys):
    """import_weights, evaluate --checkpoint, run --init-from / --backbone-weights / --resume."""
    from trainer import evaluate as ev
    from trainer import run as run_mod
    marker = tmp_path / "marker"
    f = zip_file(tmp_path / "evil.pth", _payloads(str(marker))["os.system"][0])
    common = ["--preset", "demo", "--coco-root", str(syn_root), "--no-eval", "--threads", "1", "--batch-size", "2",
              "--max-iters", "1"]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "ckpt_00000001.pth").write_bytes(f.read_bytes())
    calls = [lambda: import_weights.main([str(f), "--out", str(tmp_path / "o.pth")]),
             lambda: ev.main(["--checkpoint", str(f), "--coco-root", str(syn_root)]),
             lambda: run_mod.main(common + ["--out", str(tmp_path / "a"), "--init-from", str(f)]),
             lambda: run_mod.main(common + ["--out", str(tmp_path / "b"), "--backbone-weights", str(f)]),
             lambda: run_mod.main(common + ["--out", str(tmp_path / "r"), "--resume"])]
    for call in calls:
        assert call() == 2
        err = one_plain_line(capsys.readouterr().err)
        assert "refused" in err and "posix.system" in err and not marker.exists()
    assert not (tmp_path / "o.pth").exists()


def test_compressed_records_and_unfilled_storages_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as z:  # torch only stores
        z.writestr("archive/data.pkl", P2 + b"N.")
    with pytest.raises(cr.CheckpointError, match="compressed"):
        cr.read(tmp_path / "bomb.pth")
    one = P2 + b"(" + S("storage") + G("torch", "FloatStorage") + S("0") + S("cpu") + b"K\x01NtQ."
    with pytest.raises(cr.CheckpointError, match="does not match"):  # a storage its data never fills
        cr.read(legacy_file(tmp_path / "l.pth", one, []))


# ------------------------------------------------------------------ names and numbers from a file, downstream
ESC = "\x1b[2J\x1b]0;pwned\x07fake\nerror: injected"


def test_import_prints_a_files_tensor_names_escaped(tmp_path, capsys):
    sd = torch.load(DATA / "torchvision_state_dict.pth", weights_only=True)
    sd[ESC] = torch.zeros(1)
    torch.save(sd, tmp_path / "esc.pth")
    assert import_weights.main([str(tmp_path / "esc.pth"), "--out", str(tmp_path / "out.pth")]) == 0
    out = capsys.readouterr().out
    assert "1 unused (\\x1b[2J\\x1b]0;pwned\\x07fake\\nerror: injected)" in out
    assert "\x1b" not in out and "\x07" not in out and len(out.strip().splitlines()) == 1


def test_error_lines_escape_control_characters():
    from dali_scp import cli
    assert cli.describe(ValueError(f"a.pth: recipe {ESC}")) == \
        "a.pth: recipe \\x1b[2J\\x1b]0;pwned\\x07fake; error: injected"


def test_evaluate_checks_a_files_recipe_and_class_count_before_building(tmp_path, syn_root, capsys):
    from dali_scp.presets import RECIPES
    from trainer import evaluate as ev
    from trainer.model import build_model
    demo = RECIPES["demo"]
    model = build_model(demo, 9).state_dict()  # the synthetic set's 8 classes
    bad = {"name": dict(recipe=dict(demo.as_dict(), name=ESC, fpn_channels=demo.fpn_channels + 8), num_classes=9),
           "class count": dict(recipe=demo.as_dict(), num_classes="3"),
           "recipe": dict(recipe=dict(demo.as_dict(), image_size=10 ** 6), num_classes=9)}
    expect = {"name": "checkpoint does not match the model built from its recipe (\\x1b[2J",
              "class count": "its class count 3 is not an integer in [2, 100000]",
              "recipe": "recipe field image_size = 1000000 is outside [32, 16384]"}
    for what, state in bad.items():
        torch.save(dict(state, model=model), tmp_path / "c.pth")
        assert ev.main(["--checkpoint", str(tmp_path / "c.pth"), "--coco-root", str(syn_root)]) == 2
        err = one_plain_line(capsys.readouterr().err)
        assert expect[what] in err and "\x07" not in err, (what, err)


def test_resume_takes_only_an_optimizer_state_the_size_of_the_model():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    params = list(m.parameters())
    good = opt.state_dict()
    ckpt.check_optimizer_state(good, params, "c.pth")
    for state in ({0: {"momentum_buffer": torch.zeros(7)}}, {0: [torch.zeros(1)] * 3}, {0: {"b": {"nested": 1}}}):
        with pytest.raises(ckpt.CheckpointError, match="c.pth: its optimizer state is not one this trainer writes"):
            ckpt.check_optimizer_state(dict(good, state=state), params, "c.pth")
    s = ckpt.rng_state()
    s["numpy"]["key"] = torch.zeros(1 << 20, dtype=torch.int64)
    with pytest.raises(ckpt.CheckpointError, match="624"):
        ckpt.set_rng_state(s)
