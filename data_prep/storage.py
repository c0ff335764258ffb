"""Storage locations as URLs: `s3://bucket/prefix` or a local folder.

One small interface for the shard writer, the manifest and the streaming
loader. Writes are atomic: a local file is written under a
temporary name and renamed; an S3 object becomes visible only when its
upload completes. So a reader never sees half an object under its final
name. S3 uses boto3 with the standard AWS configuration chain
(`AWS_ENDPOINT_URL`, `AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, ...) and retries
with backoff; credentials never appear in messages.
"""

from __future__ import annotations

import base64
import io
import os
import random
import shutil
import socket
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """An object store operation that failed after retries, named by URL."""


class Store(Protocol):
    url: str

    def read_bytes(self, name: str) -> bytes: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def put_file(self, name: str, path: Path, sha256: str | None = None) -> None: ...

    def open_writer(self, name: str) -> "ObjectWriter": ...

    def discard_unfinished(self, names: list[str]) -> int: ...

    def list(self) -> list[str]: ...


class ObjectWriter(Protocol):
    """An object written as a stream, visible under its name only after `commit()`; `abort()` leaves
    nothing behind (or nothing a later `discard_unfinished` does not remove)."""

    def write(self, data: bytes) -> None: ...

    def commit(self, sha256: str | None = None) -> None: ...

    def abort(self) -> None: ...


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

    def put_file(self, name: str, path: Path, sha256: str | None = None) -> None:
        with open(path, "rb") as src:
            self.write_with(name, lambda f: shutil.copyfileobj(src, f, 1 << 22))

    def open_writer(self, name: str) -> "LocalWriter":
        self.root.mkdir(parents=True, exist_ok=True)
        return LocalWriter(self.root / temporary_name(name), self._path(name))

    def discard_unfinished(self, names: list[str]) -> int:
        """Remove what killed writers of this host left (any name: temporaries name their process)."""
        return remove_stale_temporaries(self.root)

    def read_range(self, name: str, start: int, end: int, retry: "Retry | None" = None) -> bytes:
        """Bytes [start, end) of an object; fewer if the file is shorter (a truncated shard)."""
        try:
            with open(self._path(name), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except FileNotFoundError:
            raise StorageError(f"{self.url}/{name} does not exist; was the split prepared completely "
                               "(see its manifest.json)?") from None

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))


class LocalWriter:
    """A file written under a hidden temporary name in its folder; `commit()` syncs it to disk and renames
    it into place (atomic), `abort()` deletes it."""

    def __init__(self, tmp: Path, final: Path):
        self._tmp, self._final = tmp, final
        self._file = open(tmp, "wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self, sha256: str | None = None) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Retry:
    """How long a read keeps trying: `attempts` tries, waits doubling from `backoff` up to `max_backoff` s."""
    attempts: int = 10
    backoff: float = 0.5
    max_backoff: float = 8.0

    def wait(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * 2 ** attempt)
        time.sleep(delay * (0.75 + 0.5 * random.random()))


SINGLE_PUT_BYTES = 1 << 30
"""Files up to this size are uploaded in one PUT (S3 allows 5 GiB); larger ones in multipart parts."""
PART_BYTES = 8 << 20
"""An `S3Writer`'s parts (S3's least is 5 MiB): an object smaller than this goes up in one PUT."""
_RESEND = {"BadDigest", "XAmzContentSHA256Mismatch", "RequestTimeout", "IncompleteBody"}
"""4xx answers to bytes damaged or cut short on the way: sending them again can succeed."""
_PERMANENT = {"NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403", "InvalidAccessKeyId",
              "SignatureDoesNotMatch", "PreconditionFailed", "412", "InvalidRange", "416"}


_CLIENTS: dict[tuple, object] = {}
"""boto3 clients of this process, shared by every S3Store (they are thread-safe, and costly to make)."""
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_REGION",
               "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
"""The variables that choose the endpoint and the account: a client is made again when one changes."""
_CLIENTS_LOCK = threading.Lock()
"""boto3's default session, which makes the clients, is not safe to use from two threads at once."""
os.register_at_fork(after_in_child=lambda: globals().update(_CLIENTS_LOCK=threading.Lock()))  # held by no one


class S3Store:
    def __init__(self, bucket: str, prefix: str, retry: Retry | None = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.retry = retry or Retry()
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @staticmethod
    def _shared_client(sign_payload: bool):
        """This process's client of that kind for the current AWS settings (clients do not survive fork).

        botocore retries once; `_call` and `S3Reader` (which resumes from
        the byte it reached) retry with `Retry`'s longer backoff.
        """
        key = (os.getpid(), sign_payload, *(os.environ.get(name) for name in _CLIENT_ENV))
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                _CLIENTS[key] = S3Store._make_client(sign_payload)
            return _CLIENTS[key]

    @staticmethod
    def _make_client(sign_payload: bool):
        import boto3
        from botocore.config import Config

        # checksums when the caller gives one (shards carry their SHA-256) or S3 requires one, not a
        # CRC32 pass over every upload besides
        return boto3.client("s3", config=Config(
            retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10, read_timeout=60,
            max_pool_connections=16, request_checksum_calculation="when_required",
            s3=None if sign_payload else {"payload_signing_enabled": False}))

    @property
    def _client(self):
        return self._shared_client(sign_payload=True)

    @property
    def _checksummed_client(self):
        """For requests whose body's checksum travels in a signed header that S3 checks (a shard's
        SHA-256, a part's CRC32): the client does not hash the body again for the signature, as botocore
        otherwise does over http (a second pass over every byte). See `S3Writer` on the parts."""
        return self._shared_client(sign_payload=False)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, what: str, name: str, err: Exception) -> StorageError:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", type(err).__name__)
        if code in _RESEND:
            return StorageError(f"{what} {self.url}/{name} failed after retries: {code}, the bytes did not arrive "
                                "intact. Check the network path to the endpoint, or whether the file changed "
                                "while it was sent.")
        return StorageError(f"{what} {self.url}/{name} failed after retries: {code}. Check the bucket, "
                            "the endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_* variables or profile).")

    def _call(self, what: str, name: str, action):
        """Run one request, retrying transient failures (server down, reset, 5xx, throttling) with
        `self.retry`'s backoff; a refused request (missing bucket, no access) fails at once."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        failures = 0
        while True:
            try:
                return action()
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
                if code in _PERMANENT or (400 <= status < 500 and status not in (408, 429) and code not in _RESEND
                                          and "Throttl" not in code and "SlowDown" not in code):
                    raise self._fail(what, name, err) from None
                last = err
            except S3UploadFailedError as err:
                if any(code in str(err) for code in _PERMANENT):
                    raise self._fail(what, name, err) from None
                last = err
            except (BotoCoreError, OSError) as err:
                last = err
            failures += 1
            if failures >= self.retry.attempts:
                raise self._fail(what, name, last) from None
            self.retry.wait(failures - 1)

    def read_bytes(self, name: str) -> bytes:
        return self._call("GET", name, lambda: self._client.get_object(
            Bucket=self.bucket, Key=self._key(name))["Body"].read())

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call("PUT", name, lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data))

    def put_file(self, name: str, path: Path, sha256: str | None = None) -> None:
        """Upload a file; the object appears only when complete.

        Up to SINGLE_PUT_BYTES one PUT, carrying the file's SHA-256 when the
        caller has it (a shard's, computed as it was written), which S3
        checks on arrival: no second pass over the bytes, neither for a
        checksum nor for the request's signature.
        Larger files go up in parallel multipart parts.
        """
        path = Path(path)
        if path.stat().st_size > SINGLE_PUT_BYTES:
            self._call("upload of", name, lambda: self._client.upload_file(str(path), self.bucket, self._key(name)))
            return
        self._put(name, path, sha256)

    def _put(self, name: str, body: Path | bytes, sha256: str | None) -> None:
        """One PUT of a file or bytes; with `sha256`, which S3 checks, through the unsigned-payload client."""
        extra = {"ChecksumSHA256": base64.b64encode(bytes.fromhex(sha256)).decode()} if sha256 else {}
        client = self._checksummed_client if sha256 else self._client

        def put():
            if isinstance(body, bytes):
                client.put_object(Bucket=self.bucket, Key=self._key(name), Body=body, **extra)
                return
            with open(body, "rb") as f:
                client.put_object(Bucket=self.bucket, Key=self._key(name), Body=f, **extra)
        self._call("upload of", name, put)

    def open_reader(self, name: str, retry: Retry | None = None, start: int = 0,
                    end: int | None = None) -> "S3Reader":
        return S3Reader(self._client, self.bucket, self._key(name), f"{self.url}/{name}",
                        start, end, retry or self.retry)

    def read_range(self, name: str, start: int, end: int, retry: Retry | None = None) -> bytes:
        """Bytes [start, end) of an object, resuming a broken transfer from the byte it reached;
        fewer if the object is shorter (a truncated shard), as for a local file."""
        with self.open_reader(name, retry, start, end) as reader:
            return reader.read()

    def _listing(self) -> tuple[list[str], list[str]]:
        """(object names, "folder" names) directly under this store's prefix."""
        prefix = f"{self.prefix}/" if self.prefix else ""

        def pages() -> tuple[list[str], list[str]]:
            names, folders = [], []
            for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
                folders += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return names, folders
        names, folders = self._call("LIST", "", pages)
        return sorted(names), sorted(folders)

    def list(self) -> list[str]:
        return self._listing()[0]

    def list_folders(self) -> list[str]:
        return self._listing()[1]

    def delete(self, name: str) -> None:
        self._call("DELETE", name, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(name)))

    def download(self, name: str, path: Path) -> None:
        """Stream an object to a local file (through a temporary, renamed when complete)."""
        path = Path(path)
        tmp = path.parent / temporary_name(path.name)
        try:
            with self.open_reader(name) as reader, open(tmp, "wb") as f:
                shutil.copyfileobj(reader, f, 1 << 22)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open_writer(self, name: str) -> "S3Writer":
        return S3Writer(self, name)

    def discard_unfinished(self, names: list[str]) -> int:
        """Abort the multipart uploads that a killed writer left for these objects; return how many.

        Only the names given: the caller's own (a prep rank's shards), so
        the uploads that other ranks have in progress are left alone.
        """
        wanted = {self._key(name) for name in names}
        prefix = f"{self.prefix}/" if self.prefix else ""

        def uploads() -> list[dict]:
            found = []
            for page in self._client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=prefix):
                found += [u for u in page.get("Uploads", []) if u["Key"] in wanted]
            return found
        try:
            stale = self._call("LIST uploads of", "", uploads)
        except StorageError as err:
            if "AccessDenied" not in str(err):
                raise
            warnings.warn(f"{self.url}: not allowed to list unfinished uploads (s3:ListBucketMultipartUploads), so "
                          "those a killed run left are not aborted. They are never listed as objects; a lifecycle "
                          "rule with AbortIncompleteMultipartUpload removes them.", stacklevel=2)
            return 0
        for upload in stale:
            name = upload["Key"][len(prefix):]
            try:
                self._call("abort of the upload of", name, lambda upload=upload: self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]))
            except StorageError as err:
                if "AccessDenied" in str(err):
                    warnings.warn(f"{self.url}/{name}: not allowed to abort an unfinished upload "
                                  "(s3:AbortMultipartUpload); it is never listed as an object", stacklevel=2)
                elif "NoSuchUpload" not in str(err):  # gone meanwhile: nothing left to abort
                    raise
        return len(stale)


class S3Writer:
    """An S3 object written as a stream, in multipart parts sent while the next part fills.

    Nothing is staged on local disk, and the object appears only when
    `commit()` completes the upload. An object that never fills a part goes
    up in one PUT at commit, checked against the SHA-256 given. Each part
    carries its CRC32, which S3 checks on arrival. At most two parts wait
    to be sent (memory: three parts); part sizes double every 1000 parts,
    as S3 allows 10,000. A failed part is retried like any request; `abort()`
    (or, after a kill, the next run's `discard_unfinished`) removes the
    upload's parts.

    Parts go with an unsigned payload: the CRC32 guards them against damage
    on the way, and the signature covers it and every header. Signing the
    payload too would hash every part once more, and over plain http it
    would protect nothing that training reads back: responses are not signed.
    """

    def __init__(self, store: S3Store, name: str):
        from concurrent.futures import ThreadPoolExecutor

        self._store, self._name = store, name
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list = []  # futures of {"PartNumber", "ETag", "ChecksumCRC32"}
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="s3-part")

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= PART_BYTES * 2 ** (len(self._parts) // 1000):
            self._send_part()

    def _send_part(self) -> None:
        store = self._store
        if self._upload_id is None:
            self._upload_id = store._call("start of the upload of", self._name, lambda: store._client.create_multipart_upload(
                Bucket=store.bucket, Key=store._key(self._name), ChecksumAlgorithm="CRC32")["UploadId"])
        if len(self._parts) >= 2:
            self._parts[-2].result()  # at most two parts waiting: the encoder slows to the upload's pace
        body, self._buffer = self._buffer, bytearray()
        self._parts.append(self._sender.submit(self._upload_part, len(self._parts) + 1, body))

    def _upload_part(self, number: int, body: bytearray) -> dict:
        store = self._store
        crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        response = store._call("upload of", f"{self._name} (part {number})", lambda: store._checksummed_client.upload_part(
            Bucket=store.bucket, Key=store._key(self._name), UploadId=self._upload_id, PartNumber=number,
            Body=body, ChecksumCRC32=crc))
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": crc}

    def commit(self, sha256: str | None = None) -> None:
        """Make the object visible: send what is left, wait for every part, complete the upload.
        If it fails, the caller aborts."""
        store = self._store
        if self._upload_id is None:
            store._put(self._name, bytes(self._buffer), sha256)
        else:
            if self._buffer:
                self._send_part()
            parts = [part.result() for part in self._parts]
            store._call("completion of the upload of", self._name, lambda: store._client.complete_multipart_upload(
                Bucket=store.bucket, Key=store._key(self._name), UploadId=self._upload_id,
                MultipartUpload={"Parts": parts}))
        self._sender.shutdown()

    def abort(self) -> None:
        """Drop the upload and its parts (best effort: what remains, the next run's `discard_unfinished`
        removes)."""
        for part in self._parts:
            part.cancel()
        self._sender.shutdown(wait=True)
        self._buffer = bytearray()
        if self._upload_id is not None:
            store, upload_id, self._upload_id = self._store, self._upload_id, None
            try:
                store._client.abort_multipart_upload(Bucket=store.bucket, Key=store._key(self._name),
                                                     UploadId=upload_id)
            except Exception:
                pass


class S3Reader(io.RawIOBase):
    """A GET as a file, bytes [start, end), that survives a flaky server.

    A transfer that breaks (reset, timeout, server gone) is reopened with a
    ranged GET from the byte it reached, pinned to the object's ETag (an
    object replaced meanwhile is an error, not a silent mix), after a
    backoff; `retry.attempts` failures in a row raise `StorageError`
    naming the object. A missing object or a refused request fails at once.
    """

    def __init__(self, client, bucket: str, key: str, url: str, start: int = 0, end: int | None = None,
                 retry: Retry | None = None):
        super().__init__()
        self._client, self._bucket, self._key, self.url = client, bucket, key, url
        self._pos, self._end, self._retry = start, end, retry or Retry()
        self._body = None
        self._etag: str | None = None
        self.reopened = 0  # how many times a broken transfer was resumed

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        last = "" if self._end is None else str(self._end - 1)
        args = {"Bucket": self._bucket, "Key": self._key, "Range": f"bytes={self._pos}-{last}"}
        if self._etag:
            args["IfMatch"] = self._etag
        response = self._client.get_object(**args)
        self._etag = self._etag or response.get("ETag")
        self._body = response["Body"]
        if self._end is None:  # "bytes START-/TOTAL"
            self._end = int(response["ContentRange"].rsplit("/", 1)[1]) if "ContentRange" in response \
                else self._pos + response["ContentLength"]

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:
                pass
            self._body = None

    def readinto(self, buffer) -> int:
        from botocore.exceptions import ClientError

        if self._end is not None and self._pos >= self._end:
            return 0
        view = memoryview(buffer).cast("B")
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                    if self._pos >= self._end:
                        return 0
                want = min(len(view), self._end - self._pos)
                chunk = self._body.read(want)
                if not chunk:
                    raise ConnectionError(f"transfer ended at byte {self._pos} of {self._end}")
                view[:len(chunk)] = chunk
                self._pos += len(chunk)
                return len(chunk)
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code in ("InvalidRange", "416"):  # the object ends before this position (truncated)
                    self._close_body()
                    self._end = self._pos
                    return 0
                if code in _PERMANENT:
                    self._close_body()
                    what = {"NoSuchKey": "does not exist", "404": "does not exist",
                            "PreconditionFailed": "changed while it was being read",
                            "412": "changed while it was being read"}.get(code, f"cannot be read ({code})")
                    raise StorageError(f"{self.url} {what}. Check the endpoint (AWS_ENDPOINT_URL), the "
                                       "credentials, and that the split's manifest lists what is in the bucket "
                                       "(run the prep again if shards are missing).") from None
                failures = self._failed(failures, code)
            except Exception as err:  # connection refused / reset, timeouts, truncated transfer
                failures = self._failed(failures, type(err).__name__)

    def _failed(self, failures: int, why: str) -> int:
        self._close_body()
        if failures + 1 >= self._retry.attempts:
            raise StorageError(f"reading {self.url} failed {failures + 1} times in a row at byte {self._pos} "
                               f"({why}); the object store stayed unreachable. Check the endpoint "
                               "(AWS_ENDPOINT_URL) and the network, then resume from the last checkpoint.")
        self._retry.wait(failures)
        self.reopened += 1
        return failures + 1

    def readall(self) -> bytes:
        parts = []
        while chunk := self.read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        self._close_body()
        super().close()


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files left in `folder` by killed processes of this host; return how many.

    Temporary names carry host and process id (see `temporary_name`), so
    the files of processes still running, here or on other nodes of a
    shared filesystem, are left alone.
    """
    host = socket.gethostname()
    removed = 0
    for path in folder.glob(".*.tmp") if folder.is_dir() else []:
        parts = path.name.rsplit(".", 3)  # .NAME . HOST . PID . tmp
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not _alive(int(parts[2])):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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
