"""Crafted checkpoint files for the reader's tests: pickle opcodes written by hand, wrapped in torch's zip or
legacy container, and zip records whose directory entries lie (tests/test_checkpoint_reader.py,
tests/test_checkpoint_limits.py)."""
import pickle
import struct
import zipfile
from pathlib import Path

P2 = b"\x80\x02"


def G(module, name):
    """GLOBAL module.name"""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def S(s):
    """BINUNICODE s"""
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def I(i):
    """an int opcode for i"""
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if -2 ** 31 <= i < 2 ** 31:
        return b"J" + struct.pack("<i", i)
    b = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def T(*items):
    """a tuple of the pickled items"""
    return b"(" + b"".join(items) + b"t"


def R(func, *args):
    """func(*args) via REDUCE"""
    return func + T(*args) + b"R"


def pid(key: str, numel: int, storage="FloatStorage", legacy=False, view=None) -> bytes:
    """BINPERSID of a storage: ('storage', torch.<storage>, key, 'cpu', numel[, view])"""
    items = [S("storage"), G("torch", storage), S(key), S("cpu"), I(numel)]
    if legacy:
        items.append(b"N" if view is None else T(S(view[0]), I(view[1]), I(view[2])))
    return T(*items) + b"Q"


def tensor(storage_pid: bytes, offset: int, size, stride) -> bytes:
    """_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())"""
    return R(G("torch._utils", "_rebuild_tensor_v2"), storage_pid, I(offset), T(*map(I, size)), T(*map(I, stride)),
             b"\x89", R(G("collections", "OrderedDict")))


def tensor_pickle(key: str, numel: int, size: int, storage="FloatStorage") -> bytes:
    """A whole pickle: one 1-d tensor of ``size`` elements over storage ``key`` of ``numel``."""
    return P2 + tensor(pid(key, numel, storage), 0, (size,), (1,)) + b"."


def zip_file(path: Path, pkl: bytes, records: dict | None = None, byteorder=b"little") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        z.writestr("archive/version", "3\n")
        for k, v in (records or {}).items():
            z.writestr(f"archive/data/{k}", v)
    return path


def legacy_file(path: Path, pkl: bytes, keys=(), data=b"", keys_pkl: bytes | None = None,
                protocol_pkl: bytes | None = None) -> Path:
    """torch's legacy format: magic, protocol, sys info, the pickle, its storage keys, then their data
    (``data``: each storage as an 8-byte element count and its bytes)."""
    info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
                     + (protocol_pkl or pickle.dumps(1001, protocol=2)) + pickle.dumps(info, protocol=2) + pkl
                     + (keys_pkl or pickle.dumps(list(keys), protocol=2)) + data)
    return path


def legacy_storage(values: bytes, numel: int) -> bytes:
    return struct.pack("<q", numel) + values


def patch_entry(path: Path, name: str, method=None, csize=None, usize=None) -> None:
    """Rewrite a zip entry's compression method and sizes, in its local header and in the central directory:
    what a crafted file claims about a record."""
    b = bytearray(path.read_bytes())
    for sig, m_at, c_at, u_at, n_at, head in ((b"PK\x03\x04", 8, 18, 22, 26, 30), (b"PK\x01\x02", 10, 20, 24, 28, 46)):
        i = b.find(sig)
        while i >= 0:
            n, = struct.unpack("<H", b[i + n_at: i + n_at + 2])
            if b[i + head: i + head + n] == name.encode():
                for at, v, fmt in ((m_at, method, "<H"), (c_at, csize, "<I"), (u_at, usize, "<I")):
                    if v is not None:
                        b[i + at: i + at + struct.calcsize(fmt)] = struct.pack(fmt, v)
            i = b.find(sig, i + 4)
    path.write_bytes(bytes(b))
