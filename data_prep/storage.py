"""One small interface over a local directory and an S3 prefix (AWS S3, MinIO, Ceph, moto).

S3 is reached only through boto3 with an optional endpoint URL; credentials come from the standard
AWS environment variables (or any other source boto3 reads), never from arguments. Transient errors
are retried by botocore ("standard" mode, exponential backoff with jitter); uploads above
``MULTIPART_THRESHOLD`` are multipart.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from data_prep.errors import PrepError

MULTIPART_THRESHOLD = 8 * 1024 * 1024


class StorageError(PrepError):
    """An object store problem, named with the URL it concerns."""


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str = "us-east-1"
    max_retries: int = 5

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None, max_retries: int = 5) -> S3Options:
        """Explicit values first, then AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_DEFAULT_REGION / AWS_REGION."""
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        return cls(endpoint_url=endpoint or None, region=region, max_retries=max_retries)


class Store(Protocol):
    url: str

    def put_file(self, local: Path, name: str) -> None: ...
    def put_bytes(self, data: bytes, name: str) -> None: ...
    def get_bytes(self, name: str) -> bytes: ...
    def open(self, name: str) -> IO[bytes]: ...
    def exists(self, name: str) -> bool: ...
    def size(self, name: str) -> int: ...
    def list(self) -> list[str]: ...
    def delete(self, name: str) -> None: ...
    def move(self, name: str, new_name: str) -> None: ...
    def child_url(self, name: str) -> str: ...


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not is_s3(url):
        raise StorageError(f"{url}: not an s3:// URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket in the URL (expected s3://bucket/prefix)")
    return bucket, key


def open_store(url: str, options: S3Options | None = None) -> Store:
    """A store rooted at a local directory or an s3://bucket/prefix."""
    if is_s3(url):
        return S3Store(url, options or S3Options.from_env())
    return LocalStore(url)


class LocalStore:
    def __init__(self, url: str):
        self.url = url
        self.root = Path(url)

    def _path(self, name: str) -> Path:
        return self.root / name

    def put_file(self, local: Path, name: str) -> None:
        write_atomic(self._path(name), lambda tmp: shutil.copyfile(local, tmp))

    def put_bytes(self, data: bytes, name: str) -> None:
        write_atomic(self._path(name), lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except OSError as exc:
            raise StorageError(f"{self.child_url(name)}: cannot read: {exc.strerror or exc}") from None

    def open(self, name: str) -> IO[bytes]:
        try:
            return self._path(name).open("rb")
        except OSError as exc:
            raise StorageError(f"{self.child_url(name)}: cannot open: {exc.strerror or exc}") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.child_url(name)}: cannot delete: {exc.strerror or exc}") from None

    def move(self, name: str, new_name: str) -> None:
        """Rename a file or a whole folder (one rename on the same file system)."""
        target = self._path(new_name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._path(name).replace(target)
        except OSError as exc:
            raise StorageError(f"{self.child_url(name)}: cannot move to {target}: {exc.strerror or exc}") from None

    def child_url(self, name: str) -> str:
        return str(self._path(name))


class _S3Range(io.RawIOBase):
    """An S3 object as a seekable raw file: each read is one ranged GET."""

    def __init__(self, store: S3Store, name: str, size: int):
        self.store, self.name, self.length, self.position = store, name, size, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self.position >= self.length or not len(buffer):
            return 0
        end = min(self.position + len(buffer), self.length) - 1
        try:
            body = self.store.client.get_object(
                Bucket=self.store.bucket, Key=self.store._key(self.name), Range=f"bytes={self.position}-{end}"
            )["Body"].read()
        except Exception as exc:
            raise self.store._fail("read", self.name, exc) from None
        buffer[: len(body)] = body
        self.position += len(body)
        return len(body)


class S3Store:
    def __init__(self, url: str, options: S3Options):
        import boto3
        from botocore.config import Config

        self.url = url.rstrip("/")
        self.bucket, prefix = split_s3(self.url)
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        config = Config(
            retries={"max_attempts": options.max_retries + 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        self.client = boto3.client("s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config)
        self.options = options

    def _key(self, name: str) -> str:
        return self.prefix + name

    def child_url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def _fail(self, action: str, name: str, exc: Exception) -> StorageError:
        response = getattr(exc, "response", None) or {}  # a streaming error carries response=None
        detail = response.get("Error", {}).get("Message") or str(exc)
        where = f" (endpoint {self.options.endpoint_url})" if self.options.endpoint_url else ""
        return StorageError(f"{self.child_url(name)}: cannot {action}{where}: {detail}")

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)

    def put_file(self, local: Path, name: str) -> None:
        try:
            self.client.upload_file(str(local), self.bucket, self._key(name), Config=self._transfer_config())
        except Exception as exc:  # boto3 raises several unrelated types here
            raise self._fail("upload", name, exc) from None

    def put_bytes(self, data: bytes, name: str) -> None:
        """Multipart above MULTIPART_THRESHOLD; each part retried by botocore."""
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(name), Config=self._transfer_config())
        except Exception as exc:
            raise self._fail("write", name, exc) from None

    def get_bytes(self, name: str) -> bytes:
        """botocore retries a request that fails, not a body that breaks off while it is read (the endpoint
        went away mid-transfer): that is retried here, max_retries times with backoff (1, 2, 4 ... s)."""
        from botocore.exceptions import ConnectionClosedError, ReadTimeoutError, ResponseStreamingError

        for attempt in range(self.options.max_retries + 1):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
            except (ResponseStreamingError, ReadTimeoutError, ConnectionClosedError) as exc:
                if attempt == self.options.max_retries:
                    raise self._fail("read", name, exc) from None
                time.sleep(min(2.0**attempt, 30.0))
            except Exception as exc:
                raise self._fail("read", name, exc) from None
        raise AssertionError("unreachable")

    def open(self, name: str) -> IO[bytes]:
        """A streaming body: bytes arrive as they are read, nothing is staged on disk."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except Exception as exc:
            raise self._fail("open", name, exc) from None

    def open_seekable(self, name: str) -> IO[bytes]:
        """A file object that reads by ranged GETs (Parquet's footer first, then only the row groups read)."""
        return io.BufferedReader(_S3Range(self, name, self.size(name)), buffer_size=8 << 20)

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as exc:
            if _not_found(exc):
                return False
            raise self._fail("check", name, exc) from None
        except Exception as exc:
            raise self._fail("check", name, exc) from None

    def size(self, name: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])
        except Exception as exc:
            raise self._fail("check", name, exc) from None

    def list(self) -> list[str]:
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                names += [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
        except Exception as exc:
            raise self._fail("list", "", exc) from None
        return sorted(names)

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            raise self._fail("delete", name, exc) from None

    def move(self, name: str, new_name: str) -> None:
        """Move one object or every object under the prefix ``name/``: a server-side copy (multipart above
        the transfer threshold), then the delete."""
        names = [name] if self.exists(name) else [n for n in self.list() if n.startswith(name.rstrip("/") + "/")]
        for old in names:
            new = new_name + old[len(name) :]
            try:
                source = {"Bucket": self.bucket, "Key": self._key(old)}
                self.client.copy(source, self.bucket, self._key(new), Config=self._transfer_config())
            except Exception as exc:
                raise self._fail("copy", old, exc) from None
            self.delete(old)

    def get_with_etag(self, name: str) -> tuple[bytes, str] | None:
        """The object and its ETag, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            return response["Body"].read(), response["ETag"]
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise self._fail("read", name, exc) from None
        except Exception as exc:
            raise self._fail("read", name, exc) from None

    def put_if(self, data: bytes, name: str, etag: str | None) -> str | None:
        """Write only if the object is still the one with ``etag`` (None: only if there is none): S3's
        conditional writes (AWS, MinIO, Ceph). Returns the new ETag, or None when the condition failed."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, **condition)["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise self._fail("write", name, exc) from None
        except Exception as exc:
            raise self._fail("write", name, exc) from None


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def write_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """Write ``target`` through a temporary file in its own folder, renamed over it when complete: a
    reader never sees a partial file, and on failure nothing partial remains. The file gets the usual
    permissions (0666 less the umask). Failures name the path: `StorageError`."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        if target.is_dir():
            raise IsADirectoryError(21, "is a directory; name a file inside it")
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StorageError(f"{target}: cannot write: {exc.strerror or exc}") from None


def read_json(store: Store, name: str, what: str = "") -> Any:
    """A JSON file of an output (its progress, plan, unit records): one that is truncated or not JSON is named,
    with what to do, instead of a traceback."""
    data = store.get_bytes(name)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(
            f"{store.child_url(name)}: not valid JSON ({getattr(exc, 'msg', exc)}; {len(data)} bytes: truncated?)"
            + (f"; {what}" if what else "")
        ) from None


def write_text(target: Path, text: str) -> None:
    """`write_atomic` for a text file (specs, reports, records)."""
    write_atomic(target, lambda tmp: tmp.write_text(text))


def make_dir(directory: Path) -> Path:
    """``mkdir -p``, failing with a `StorageError` that names the folder (a path through a file, no permission)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{directory}: cannot create the folder: {exc.strerror or exc}") from None
    return directory


def check_writable(store: Store) -> None:
    """Find an output location that cannot work before any work is done. An S3 prefix: write and delete a
    small object. A local directory: creates nothing; the directory (or the nearest existing folder above
    it, which the run would create it in) must be a writable folder, which a small file proves."""
    if isinstance(store, LocalStore):
        existing = store.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"{store.url}: cannot write: {existing} is a file, not a folder")
        probe = existing / f".parcae-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"{store.url}: cannot write in {existing}: {exc.strerror or exc}") from None
        return
    name = f".parcae-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    store.put_bytes(b"", name)
    store.delete(name)


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size
