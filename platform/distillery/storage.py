"""Paths that may be local folders or pyarrow-filesystem URIs (file://, s3://, gs://, ...)."""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any

import pyarrow.fs as pafs

from .errors import DataError


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Local paths are made absolute so Ray workers agree on them."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
            raise DataError(f"cannot open {path}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """The folder holding `path` (a URI's ".." is not resolved by the filesystem: it would make a
    folder named after the file)."""
    return posixpath.dirname(path.rstrip("/")) if is_uri(path) else os.path.dirname(os.path.abspath(path))


def absolute(path: str) -> str:
    return path if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def holds_anything(path: str) -> bool:
    """Whether `path` (path or URI) is a file or a folder with anything in it."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        return bool(fs.get_file_info(pafs.FileSelector(p)))
    return info.type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def remove(path: str) -> None:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    """Write through a temporary name and rename, so readers never see half a file."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    tmp = p + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    try:
        fs.move(tmp, p)
    except OSError:  # object stores without rename: write in place
        with fs.open_output_stream(p) as f:
            f.write(text.encode("utf-8"))
        fs.delete_file(tmp)


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def list_files(path: str, extensions: tuple[str, ...] = ()) -> list[str]:
    """Files under `path` (itself if it is a file), sorted, as paths/URIs in the same style."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path} does not exist: check the path in your config or override")
    if info.type == pafs.FileType.File:
        return [path]
    found = []
    for child in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        name = posixpath.basename(child.path)
        if child.type != pafs.FileType.File or name.startswith((".", "_")):
            continue
        if extensions and not name.lower().endswith(extensions):
            continue
        rel = posixpath.relpath(child.path, p)
        found.append(join(path, *rel.split("/")))
    return sorted(found)


CONTENT_FINGERPRINT_MAX_BYTES = 1 << 30


def fingerprint(path: str) -> dict:
    """Identity of a file or folder: count, bytes and a hash of every file's name, size and content
    (`identity: content`), or of name, size and mtime when the whole input is over
    CONTENT_FINGERPRINT_MAX_BYTES (`identity: mtime`). Content, because a re-mounted, re-synced or
    re-uploaded copy of the same data gets fresh mtimes, and an mtime in the identity would throw
    away every finished stage over it; reading 1 GiB costs seconds, next to the stages it saves."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return {"path": path, "exists": False}
    infos = [info] if info.type == pafs.FileType.File else [
        i for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if i.type == pafs.FileType.File
    ]
    infos.sort(key=lambda i: i.path)
    total = sum(i.size or 0 for i in infos)
    by_content = total <= CONTENT_FINGERPRINT_MAX_BYTES
    h = hashlib.sha256()
    for i in infos:
        name = posixpath.relpath(i.path, p) if i.path != p else posixpath.basename(p)
        ident = _content_sha256(fs, i.path) if by_content else i.mtime_ns
        h.update(f"{name}|{i.size}|{ident}\n".encode())
    return {"path": path, "files": len(infos), "bytes": total, "identity": "content" if by_content else "mtime",
            "sha256": h.hexdigest()}


def _content_sha256(fs: pafs.FileSystem, p: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path: str) -> str:
    """sha256 of a file's bytes (path or URI), read in 1 MiB blocks."""
    fs, p = resolve(path)
    return _content_sha256(fs, p)


def copy_dir(src: str, dest: str) -> None:
    """Replace folder `dest` with a copy of folder `src` (each a path or URI)."""
    with local_copy(src) as local:
        upload_dir(local, dest)


def upload_dir(local_dir: str, dest: str) -> None:
    """Replace folder `dest` (path or URI) with the contents of `local_dir`."""
    if not is_uri(dest):
        import shutil
        tmp = dest.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return
    fs, p = resolve(dest)
    if exists(dest):
        fs.delete_dir(p)
    fs.create_dir(p, recursive=True)  # copy_files does not make missing folders on every filesystem
    pafs.copy_files(local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_file(local_file: str, dest: str) -> None:
    """Write file `dest` (path or URI) with the contents of `local_file`, replacing it whole."""
    if not is_uri(dest):
        import shutil
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.copyfile(local_file, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        return
    fs, p = resolve(dest)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    pafs.copy_files(local_file, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


class local_copy:
    """`with local_copy(path_or_uri) as folder:` a local folder with the same files."""

    def __init__(self, path: str):
        self.path, self._tmp = path, None

    def __enter__(self) -> str:
        if not is_uri(self.path):
            return self.path
        import tempfile
        self._tmp = tempfile.mkdtemp(prefix="distillery-")
        fs, p = resolve(self.path)
        pafs.copy_files(p, self._tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return self._tmp

    def __exit__(self, *exc) -> None:
        if self._tmp:
            import shutil
            shutil.rmtree(self._tmp, ignore_errors=True)
