"""Storage locations as URLs: `s3://bucket/prefix` or a local folder.

One small interface for the shard writer, the manifest and (later) the
streaming loader. Writes are atomic: a local file is written under a
temporary name and renamed; an S3 object becomes visible only when its
upload completes. So a reader never sees half an object under its final
name. S3 uses boto3 with the standard AWS configuration chain
(`AWS_ENDPOINT_URL`, `AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, ...) and retries
with backoff; credentials never appear in messages.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """An object store operation that failed after retries, named by URL."""


class Store(Protocol):
    url: str

    def read_bytes(self, name: str) -> bytes: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def put_file(self, name: str, path: Path) -> None: ...

    def list(self) -> list[str]: ...


class LocalStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def write_with(self, name: str, fill) -> None:
        """Write through a temporary in the same folder, fsync, rename into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / temporary_name(name)
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(name))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write_with(name, lambda f: f.write(data))

    def put_file(self, name: str, path: Path) -> None:
        path = Path(path)
        if path.resolve().parent == self.root.resolve():  # our own temporary: sync and rename
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(path, self._path(name))
            return
        with open(path, "rb") as src:
            self.write_with(name, lambda f: shutil.copyfileobj(src, f, 1 << 22))

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))

    def scratch_dir(self) -> Path:
        """A folder for temporary files on the same filesystem (renames stay atomic)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by killed processes of this host; return how many.

        Temporary names carry host and process id (see `temporary_name`), so
        the files of processes still running, here or on other nodes of a
        shared filesystem, are left alone.
        """
        host = socket.gethostname()
        removed = 0
        for path in self.root.glob(".*.tmp") if self.root.is_dir() else []:
            parts = path.name.rsplit(".", 3)  # .NAME . HOST . PID . tmp
            if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not _alive(int(parts[2])):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class S3Store:
    def __init__(self, bucket: str, prefix: str):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = boto3.client(
            "s3", config=Config(retries={"max_attempts": 8, "mode": "adaptive"},
                                connect_timeout=10, read_timeout=60))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, what: str, name: str, err: Exception) -> StorageError:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", type(err).__name__)
        return StorageError(f"{what} {self.url}/{name} failed after retries: {code}. Check the bucket, "
                            "the endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_* variables or profile).")

    def read_bytes(self, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except (BotoCoreError, ClientError) as err:
            raise self._fail("GET", name, err) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except (BotoCoreError, ClientError) as err:
            raise self._fail("PUT", name, err) from None

    def put_file(self, name: str, path: Path) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # multipart above 8 MiB; the object appears only when complete
            self._client.upload_file(str(path), self.bucket, self._key(name))
        except (BotoCoreError, ClientError, S3UploadFailedError) as err:
            raise self._fail("upload of", name, err) from None

    def list(self) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = f"{self.prefix}/" if self.prefix else ""
        names = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as err:
            raise self._fail("LIST", "", err) from None
        return sorted(names)

    def scratch_dir(self) -> Path:
        return Path(tempfile.gettempdir())


def temporary_name(name: str) -> str:
    """`.NAME.HOST.PID.tmp`: hidden, and traceable to the process that writes it."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_store(url: str) -> LocalStore | S3Store:
    """`s3://bucket/prefix` -> S3Store; anything else is a local folder."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{url!r}: an S3 URL needs a bucket, as in s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"{url!r}: storage must be s3://bucket/prefix or a local folder")
    return LocalStore(parsed.path if parsed.scheme == "file" else url)
