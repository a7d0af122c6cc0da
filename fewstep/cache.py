"""Row caches for what a run encodes once before its first step: prompt embeddings and real-image latents.

A cache is a table of rows: named tensors that share their first dimension (``prompt_embeds``, ``latents``, ...).
It lives in memory, or on disk as safetensors shards (``shard-00000.safetensors``, ...) with an ``index.json``
(``data.cache``: ``memory``, ``disk``, or ``auto``: disk once the table would be larger than
``data.cache_memory_mb``).  A batch reads only its rows: the shard files are read with plain positioned reads (no
memory map), so the process's memory does not grow with the size of the cache.

A disk cache is written shard by shard into ``.tmp-NAME-PID`` beside its folder; the index is written last, every
file is fsynced and the folder is renamed into place.  A killed run therefore leaves either no cache or a complete
one.  The index records a *fingerprint* (a hash of what the rows were computed from: teacher, resolution, prompt or
file list, dtype); a cache is reused only when it is complete (index present, every shard of its recorded size) and
its fingerprint matches, else it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

MODES = ("auto", "memory", "disk")  # data.cache
INDEX = "index.json"
FORMAT = 1  # index format version: an index of another version is not trusted
SHARD_BYTES = 256 << 20  # rows per shard: about this many bytes
OPEN_FILES = 32  # shard files a disk store keeps open at once (least recently used closed first)

# safetensors dtype names <-> torch dtypes (what this module writes)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def fingerprint(**parts) -> str:
    """A stable hash of ``parts`` (JSON-able values; others by their ``str``)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_stats(files: Iterable) -> str:
    """A hash of each file's path, size and modification time (a changed image changes a latent cache's fingerprint)."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


def resolve_mode(mode: str, nbytes: int, max_memory_bytes: float, folder) -> str:
    """``memory`` or ``disk`` for a table of ``nbytes`` (``auto``: disk when larger than ``max_memory_bytes`` and a
    cache folder is known).  A one-line ValueError for an unknown mode, or ``disk`` without a folder."""
    if mode not in MODES:
        raise ValueError(f"data.cache must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "disk" and folder is None:
        raise ValueError("data.cache=disk needs a cache folder (data.cache_dir, or a run's output_dir)")
    if mode == "auto":
        return "disk" if folder is not None and nbytes > max_memory_bytes else "memory"
    return mode


class MemoryRows:
    """A row table held in memory (one tensor per name); ``extra``: tensors stored beside the rows, whole."""

    kind = "memory"

    def __init__(self, tensors: dict[str, Tensor], extra: Optional[dict[str, Tensor]] = None):
        self.tensors = tensors
        self.extra = dict(extra or {})
        self.n = len(next(iter(tensors.values()))) if tensors else 0

    def __len__(self) -> int:
        return self.n

    def rows(self, idx) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return {k: v[idx] for k, v in self.tensors.items()}


class DiskRows:
    """A complete row table on disk (:func:`open_rows`); :meth:`rows` reads only the rows asked for."""

    kind = "disk"

    def __init__(self, folder: Path, index: dict):
        self.folder = Path(folder)
        self.index = index
        self.n = int(index["rows"])
        self.keys = {k: (_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in index["keys"].items()}
        starts, s = [], 0
        for sh in index["shards"]:
            starts.append(s)
            s += sh["rows"]
        self._starts = starts
        self._files: OrderedDict = OrderedDict()  # shard -> (open file, {key: (data offset, row bytes)})
        self.extra: dict[str, Tensor] = {}
        if index.get("extra"):
            from safetensors.torch import load_file

            self.extra = load_file(str(self.folder / index["extra"]["file"]))

    def __len__(self) -> int:
        return self.n

    def _shard(self, i: int):
        got = self._files.get(i)
        if got is not None:
            self._files.move_to_end(i)
            return got
        f = open(self.folder / self.index["shards"][i]["file"], "rb")
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        base = 8 + hlen
        layout = {}
        for k in self.keys:
            begin, end = header[k]["data_offsets"]
            rows = self.index["shards"][i]["rows"]
            layout[k] = (base + begin, (end - begin) // rows)
        self._files[i] = (f, layout)
        while len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1][0].close()
        return self._files[i]

    def rows(self, idx) -> dict[str, Tensor]:
        import bisect

        idx = [int(i) for i in torch.as_tensor(idx).reshape(-1).tolist()]
        out = {k: torch.empty((len(idx), *shape), dtype=dtype) for k, (dtype, shape) in self.keys.items()}
        for j, i in enumerate(idx):
            if not 0 <= i < self.n:
                raise IndexError(f"row {i} of a {self.n}-row cache in {self.folder}")
            s = bisect.bisect_right(self._starts, i) - 1
            f, layout = self._shard(s)
            r = i - self._starts[s]
            for k, (off, nb) in layout.items():
                f.seek(off + r * nb)
                buf = f.read(nb)
                if len(buf) != nb:
                    raise OSError(f"cache shard {f.name} is shorter than its index says; delete {self.folder}")
                if nb:
                    out[k][j] = torch.frombuffer(bytearray(buf), dtype=out[k].dtype).reshape(out[k].shape[1:])
        return out

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


def open_rows(folder, fp: str) -> Optional[DiskRows]:
    """The complete cache in ``folder`` whose fingerprint is ``fp``; ``None`` if there is none, it is incomplete
    (no index, a shard missing or of another size) or it was computed from something else."""
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX).read_text())
        if index.get("format") != FORMAT or index.get("fingerprint") != fp:
            return None
        for sh in index["shards"]:
            if (folder / sh["file"]).stat().st_size != sh["bytes"]:
                return None
        if sum(sh["rows"] for sh in index["shards"]) != index["rows"]:
            return None
        extra = index.get("extra")
        if extra and (folder / extra["file"]).stat().st_size != extra["bytes"]:
            return None
        return DiskRows(folder, index)
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RowWriter:
    """Write a table of ``n`` rows chunk by chunk (:meth:`append`), in memory or as a disk cache in ``folder``
    (``mode`` as :func:`resolve_mode`, decided at the first chunk from its row size); :meth:`finish` returns the
    store.  Only about one shard of rows is held at a time when writing to disk."""

    def __init__(self, n: int, mode: str, folder=None, fp: str = "", max_memory_bytes: float = float("inf"),
                 meta: Optional[dict] = None):
        self.n, self.mode, self.fp, self.limit = int(n), mode, fp, max_memory_bytes
        self.folder = None if folder is None else Path(folder)
        self.meta = meta or {}
        self.written = 0
        self.kind: Optional[str] = None
        self._mem: dict[str, Tensor] = {}
        self._buf: list[dict[str, Tensor]] = []
        self._buf_rows = 0
        self._shards: list[dict] = []
        self._keys: dict = {}
        self._tmp: Optional[Path] = None
        resolve_mode(mode, 0, max_memory_bytes, self.folder)  # an unknown mode fails before any encoding

    def append(self, chunk: dict[str, Tensor]) -> None:
        rows = len(next(iter(chunk.values())))
        if self.written + rows > self.n:
            raise ValueError(f"{self.written + rows} rows written to a table of {self.n}")
        chunk = {k: v.detach().cpu().contiguous() for k, v in chunk.items()}
        if self.kind is None:
            row_bytes = sum(v[0].numel() * v.element_size() for v in chunk.values())
            self.kind = resolve_mode(self.mode, row_bytes * self.n, self.limit, self.folder)
            self._keys = {k: {"dtype": next(n for n, d in _DTYPES.items() if d == v.dtype), "shape": list(v.shape[1:])}
                          for k, v in chunk.items()}
            self._per_shard = max(1, SHARD_BYTES // max(row_bytes, 1))
            if self.kind == "memory":
                self._mem = {k: torch.empty((self.n, *v.shape[1:]), dtype=v.dtype) for k, v in chunk.items()}
            else:
                self._start_disk()
        if self.kind == "memory":
            for k, v in chunk.items():
                self._mem[k][self.written:self.written + rows] = v
        else:
            self._buf.append(chunk)
            self._buf_rows += rows
            while self._buf_rows >= self._per_shard:
                self._flush(self._per_shard)
        self.written += rows

    def _start_disk(self) -> None:
        from .export import TMP_PREFIX, clean_stale

        self.folder.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.folder.parent, self.folder.name + "-")  # temp folders an interrupted writer left
        self._tmp = self.folder.parent / f"{TMP_PREFIX}{self.folder.name}-{os.getpid()}"
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()

    def _flush(self, rows: int) -> None:
        from safetensors.torch import save_file

        keys = list(self._buf[0])
        whole = {k: torch.cat([c[k] for c in self._buf]) for k in keys}
        shard = {k: v[:rows].contiguous() for k, v in whole.items()}
        rest = {k: v[rows:] for k, v in whole.items()}
        self._buf = [rest] if len(next(iter(rest.values()))) else []
        self._buf_rows -= rows
        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(shard, str(self._tmp / name))
        self._shards.append({"file": name, "rows": rows, "bytes": (self._tmp / name).stat().st_size})

    def abort(self) -> None:
        """Drop what was written (a failed or interrupted build): nothing half-written is left to be trusted."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def finish(self, extra: Optional[dict[str, Tensor]] = None):
        """The complete store; ``extra``: small tensors kept beside the rows (``store.extra``), e.g. a null branch."""
        if self.written != self.n:
            raise ValueError(f"a table of {self.n} rows got {self.written}")
        if self.kind is None:  # no rows at all
            return MemoryRows({}, extra)
        if self.kind == "memory":
            return MemoryRows(self._mem, extra)
        from safetensors.torch import save_file

        from .export import fsync_tree, replace_dir

        if self._buf_rows:
            self._flush(self._buf_rows)
        index = {"format": FORMAT, "fingerprint": self.fp, "rows": self.n, "keys": self._keys, "shards": self._shards,
                 "meta": self.meta}
        if extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()},
                      str(self._tmp / "extra.safetensors"))
            index["extra"] = {"file": "extra.safetensors", "bytes": (self._tmp / "extra.safetensors").stat().st_size}
        (self._tmp / INDEX).write_text(json.dumps(index, indent=1))
        fsync_tree(self._tmp)
        done = open_rows(self.folder, self.fp)
        if done is not None:  # another process finished the same cache first: keep that one
            self.abort()
            return done
        replace_dir(self._tmp, self.folder)
        self._tmp = None
        store = open_rows(self.folder, self.fp)
        if store is None:
            raise OSError(f"the cache just written to {self.folder} does not read back")
        return store


def build_rows(n: int, chunks: Iterable[dict[str, Tensor]], mode: str, folder=None, fp: str = "",
               max_memory_bytes: float = float("inf"), what: str = "cache", meta: Optional[dict] = None,
               extra: Optional[dict[str, Tensor]] = None):
    """Write the ``chunks`` (an iterable of ``{name: rows}``) into a store (:class:`RowWriter`), with ``extra``
    (read once the chunks are exhausted: the iterable may fill it in); a failed disk write removes its temp folder
    and raises a one-line WriteError."""
    from .export import write_failure

    w = RowWriter(n, mode, folder, fp, max_memory_bytes, meta)
    try:
        for chunk in chunks:
            w.append(chunk)
        return w.finish(extra)
    except BaseException as e:
        w.abort()
        err = write_failure(e, folder, f"{what} ") if isinstance(e, Exception) and folder is not None else None
        if err is not None:
            raise err from None
        raise


