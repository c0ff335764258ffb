"""Storage locations as URLs: `s3://bucket/prefix` or a local folder.

One small interface for the shard writer, the manifest, the streaming
loader and the checkpoint mirror. Writes are atomic: a local file is
written under a temporary name and renamed; an S3 object becomes visible
only when its upload completes. So a reader never sees half an object
under its final name. S3 uses boto3 with the standard AWS configuration
chain (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, ...).

Errors: one that no retry mends (no credentials, access denied, no such
bucket or object, a malformed endpoint URL) fails at once, naming the URL
and the fix. A transient one (server down or busy, a broken connection) is
retried by one layer, `Retry` (botocore's own retries are off); once a
request has waited more than `QUIET_WAIT` s, each retry says on stderr
what it waits for. Credentials never appear in messages.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Protocol, runtime_checkable
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


DELETE_BATCH = 1000
"""Keys per DeleteObjects request (S3's limit)."""


class StorageError(RuntimeError):
    """An object store operation that failed (at once, or after retries), named by URL."""


@runtime_checkable
class Store(Protocol):
    """What callers use of a storage location; `LocalStore` and `S3Store` both provide all of it."""

    url: str

    def read_bytes(self, name: str) -> bytes: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def write_with(self, name: str, fill: Callable[[BinaryIO], object]) -> None: ...

    def put_file(self, name: str, path: Path, sha256: str | None = None) -> None: ...

    def open_writer(self, name: str) -> "ObjectWriter": ...

    def discard_unfinished(self, names: list[str]) -> int: ...

    def read_range(self, name: str, start: int, end: int, retry: "Retry | None" = None) -> bytes: ...

    def open_reader(self, name: str, retry: "Retry | None" = None, start: int = 0,
                    end: int | None = None) -> io.RawIOBase: ...

    def download(self, name: str, path: Path) -> None: ...

    def list(self) -> list[str]: ...

    def list_folders(self) -> list[str]: ...

    def delete(self, name: str) -> None: ...

    def delete_many(self, names: list[str]) -> None: ...


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

    def write_with(self, name: str, fill: Callable[[BinaryIO], object]) -> None:
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

    def open_reader(self, name: str, retry: "Retry | None" = None, start: int = 0,
                    end: int | None = None) -> "LocalReader":
        """Bytes [start, end) of a file as a file (`end=None`: to its end); fewer if it is shorter."""
        try:
            return LocalReader(self._path(name), start, end)
        except (FileNotFoundError, NotADirectoryError):
            raise StorageError(f"{self.url}/{name} does not exist; was the split prepared completely "
                               "(see its manifest.json)?") from None

    def read_range(self, name: str, start: int, end: int, retry: "Retry | None" = None) -> bytes:
        """Bytes [start, end) of an object; fewer if the file is shorter (a truncated shard)."""
        with self.open_reader(name, retry, start, end) as reader:
            return reader.read()

    def download(self, name: str, path: Path) -> None:
        """Copy a file to `path` (through a temporary beside it, renamed when complete)."""
        with self.open_reader(name) as reader:
            LocalStore(Path(path).parent).write_with(Path(path).name,
                                                     lambda f: shutil.copyfileobj(reader, f, 1 << 22))

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))

    def list_folders(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, name: str) -> None:
        """Remove a file; one that is not there is no error (as on S3)."""
        self._path(name).unlink(missing_ok=True)

    def delete_many(self, names: list[str]) -> None:
        """Remove files (names may hold `/`: files in subfolders); missing ones are no error."""
        for name in names:
            self.delete(name)


class LocalReader(io.RawIOBase):
    """Bytes [start, end) of a local file as a file, like `S3Reader` (`end=None`: to the file's end)."""

    def __init__(self, path: Path, start: int = 0, end: int | None = None):
        super().__init__()
        self._file = open(path, "rb")
        self._file.seek(start)
        self._pos, self._end = start, end
        self.url = str(path)
        self.reopened = 0  # as S3Reader's: a local read is never resumed

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view) if self._end is None else max(0, min(len(view), self._end - self._pos))
        got = self._file.readinto(view[:want]) if want else 0
        self._pos += got
        return got

    def readall(self) -> bytes:
        data = self._file.read(-1 if self._end is None else max(0, self._end - self._pos))
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._file.close()
        super().close()


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


QUIET_WAIT = 2.0
"""Seconds a request may wait for retries silently (a blip); past them each retry says on stderr what it
waits for."""


@dataclass(frozen=True)
class Retry:
    """How long a request keeps trying: `attempts` tries, waits doubling from `backoff` up to `max_backoff` s
    (each jittered by +-25%)."""
    attempts: int = 10
    backoff: float = 0.5
    max_backoff: float = 8.0

    def delay(self, attempt: int) -> float:
        """The wait after failure number `attempt` (from 0)."""
        return min(self.max_backoff, self.backoff * 2 ** min(attempt, 60)) * (0.75 + 0.5 * random.random())

    def longest(self, attempt: int) -> float:
        """The most that the waits from failure number `attempt` (from 0) on can take together."""
        return 1.25 * sum(min(self.max_backoff, self.backoff * 2 ** min(a, 60))
                          for a in range(attempt, self.attempts - 1))

    def wait(self, attempt: int) -> None:
        time.sleep(self.delay(attempt))


class _Retrying:
    """The failures in a row of one request: each waits by `retry`, and once the waits pass `QUIET_WAIT` s,
    one line on stderr says what for and how much longer at most."""

    def __init__(self, retry: Retry, url: str, what: str):
        self.retry, self.url, self.what = retry, url, what
        self.failures, self.waited, self.started = 0, 0.0, time.monotonic()

    def failed(self, why: str) -> bool:
        """Count a transient failure: wait and return True, or return False once the attempts are spent."""
        self.failures += 1
        if self.failures >= self.retry.attempts:
            return False
        delay = self.retry.delay(self.failures - 1)
        if self.waited + delay > QUIET_WAIT:
            more = self.retry.longest(self.failures - 1)
            print(f"waiting for {self.url} ({self.what}): {why}; attempt {self.failures} of "
                  f"{self.retry.attempts} failed, retrying for up to {max(1, round(more))} s more",
                  file=sys.stderr, flush=True)
        time.sleep(delay)
        self.waited += delay
        return True

    def spent(self) -> str:
        return f"{self.failures} attempts in {time.monotonic() - self.started:.0f} s"


SINGLE_PUT_BYTES = 1 << 30
"""Files up to this size are uploaded in one PUT (S3 allows 5 GiB); larger ones in multipart parts."""
PART_BYTES = 8 << 20
"""An `S3Writer`'s parts (S3's least is 5 MiB): an object smaller than this goes up in one PUT."""
_RESEND = {"BadDigest", "XAmzContentSHA256Mismatch", "RequestTimeout", "IncompleteBody"}
"""4xx answers to bytes damaged or cut short on the way: sending them again can succeed."""
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CHANGED = {"PreconditionFailed", "412"}
_REFUSED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
            "ExpiredToken", "AllAccessDisabled", "AccountProblem", "InvalidSecurity"}
"""Answers that refuse the credentials, or what they are allowed to do."""
_PERMANENT = _MISSING | _CHANGED | _REFUSED | {"NoSuchBucket", "InvalidRange", "416"}
"""Error codes that no retry mends (besides them, any 4xx but 408, 429, throttling and `_RESEND`)."""

_CREDENTIALS_FIX = ("Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (any values for a server without auth), or "
                    "AWS_PROFILE naming a profile of the shared credentials file (~/.aws/credentials, or the file "
                    "that AWS_SHARED_CREDENTIALS_FILE names).")
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound",
                      "UnknownCredentialError", "SSOError", "TokenRetrievalError", "RefreshWithMFAUnsupportedError"}
"""botocore's errors (class names) for credentials that are missing or cannot be loaded."""
_ENDPOINT_ERRORS = {"EndpointProviderError", "InvalidEndpointConfigurationError"}
"""botocore's errors for an endpoint URL it cannot use (besides the ValueError of a client made with one)."""
_CONFIG_ERRORS = {"InvalidConfigError", "ParamValidationError", "InvalidS3AddressingStyleError",
                  "UnsupportedS3ArnError", "InvalidDNSNameError", "InvalidRegionError", "NoRegionError",
                  "MissingDependencyException", "InvalidRetryConfigurationError"}
"""botocore's errors for a request or configuration that cannot work as it is: no retry changes it."""


def _endpoint_variable() -> str:
    """The variable that sets the S3 endpoint here (the S3-specific one wins), for messages."""
    return "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"


def _shown(url: str | None) -> str:
    """An endpoint URL fit for a message: without any user:password@ in it."""
    return re.sub(r"//[^/@]*@", "//", str(url))


def _classes(err: BaseException) -> set[str]:
    return {c.__name__ for c in type(err).__mro__}


def _error_code(err: BaseException) -> tuple[str, int | None]:
    """(S3 error code, HTTP status) of an error answer; (class name, None) of anything else."""
    response = getattr(err, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return (str(response.get("Error", {}).get("Code", "")) or type(err).__name__,
                response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500))
    if "S3UploadFailedError" in _classes(err):  # "... An error occurred (NoSuchBucket) when calling ..."
        found = re.search(r"An error occurred \(([^)]+)\)", str(err))
        if found:
            return found.group(1), None
    return type(err).__name__, None


def _network_reason(err: BaseException) -> str:
    """What a failure to reach the server was, from the errors it chains to (refused, reset, timed out)."""
    seen: BaseException | None = err
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return "connection reset"
        if isinstance(seen, socket.gaierror):
            return "host name not found"
        if isinstance(seen, TimeoutError) or "Timeout" in type(seen).__name__:
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    names = _classes(err)
    if "ConnectionClosedError" in names:
        return "connection closed"
    if names & {"IncompleteReadError", "ResponseStreamingError"}:
        return "transfer cut short"
    if "EndpointConnectionError" in names:
        return "could not connect"
    if type(err).__module__ == "builtins" and str(err):
        return str(err)  # as S3Reader's "transfer ended at byte ..."
    return "request failed"


def _diagnose(err: BaseException, bucket: str, endpoint: str) -> tuple[str, str | None]:
    """(what went wrong, in a few words, with its error code; how to fix it) for an error that no retry
    mends, or (what went wrong, None) for one that a retry may (server down or busy, broken connection).
    Never any credential: only codes, class names and the endpoint."""
    names = _classes(err)
    code, status = _error_code(err)
    variable = _endpoint_variable()
    if names & _CREDENTIAL_ERRORS:
        if "NoCredentialsError" in names:
            return "no credentials found (NoCredentialsError)", _CREDENTIALS_FIX
        if "PartialCredentialsError" in names:
            missing = getattr(err, "kwargs", {}).get("cred_var", "a variable")
            return f"credentials incomplete, {missing} missing (PartialCredentialsError)", _CREDENTIALS_FIX
        if "ProfileNotFound" in names:
            profile = getattr(err, "kwargs", {}).get("profile", "")
            return (f"the AWS profile {profile!r} does not exist (ProfileNotFound)",
                    "Set AWS_PROFILE to a profile of the AWS config or credentials file (AWS_CONFIG_FILE, "
                    "AWS_SHARED_CREDENTIALS_FILE), or unset it and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
        return (f"the credentials could not be loaded ({type(err).__name__})",
                "Check the credential source of the AWS profile (credential_process, or an SSO login that may "
                "have expired), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
    if names & _ENDPOINT_ERRORS or (isinstance(err, ValueError) and re.search(r"endpoint|url", str(err), re.I)):
        value = os.environ.get(variable)
        if value is None:  # from the AWS config file
            return (f"the endpoint URL of the AWS profile (endpoint_url) is not valid ({type(err).__name__})",
                    f"Fix endpoint_url in the AWS config (AWS_CONFIG_FILE), or set {variable} to the S3 server's "
                    "URL with its scheme, as in http://HOST:PORT or https://HOST.")
        return (f"the endpoint URL {variable}={_shown(value)!r} is not valid ({type(err).__name__})",
                f"Set {variable} to the S3 server's URL with its scheme, as in http://HOST:PORT or https://HOST, "
                "or unset it for AWS.")
    if names & _CONFIG_ERRORS:
        return f"{type(err).__name__}: {_shown(err)}", "Check the S3 URL, the region (AWS_REGION) and the AWS config."
    if code == "NoSuchBucket":
        return (f"NoSuchBucket, bucket {bucket!r} does not exist at {endpoint}",
                f"Create it, or check the bucket in the URL and the endpoint ({variable}).")
    if code in _MISSING:
        return (f"{code}, it does not exist",
                "Check the name, and that what should have written it completed.")
    if code in _CHANGED:
        return f"{code}, it changed meanwhile", "Another process replaced it: run again once that one is done."
    if code in _REFUSED:
        return (f"{code}, access refused by {endpoint}",
                f"Check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and that "
                f"they may use bucket {bucket!r}; some servers answer so for a bucket that does not exist.")
    if code in _RESEND:
        return code, None
    if status is not None:
        if 400 <= status < 500 and status not in (408, 429) and "Throttl" not in code and "SlowDown" not in code:
            return (f"{code} (HTTP {status})",
                    f"Check the bucket, the endpoint ({variable}) and the credentials (AWS_* variables or profile).")
        return f"{code} (HTTP {status})", None
    if code != type(err).__name__:  # an upload's error answer, known by its code only
        if code in _PERMANENT:
            return _diagnose(_Answer(code), bucket, endpoint)
        return f"{code} ({type(err).__name__})", None
    return f"{_network_reason(err)} ({type(err).__name__}), endpoint {endpoint}", None


class _Answer(Exception):
    """An S3 error answer known only by its code (as an S3UploadFailedError carries it)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": 400}}


_CLIENTS: dict[tuple, object] = {}
"""boto3 clients of this process, shared by every S3Store (they are thread-safe, and costly to make), by
(process, kind, digest of the AWS settings)."""
_SESSIONS: dict[tuple, object] = {}
"""The boto3 session that made them, one per (process, AWS settings): it reads the settings once."""
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_CA_BUNDLE",
               "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
               "AWS_CONTAINER_CREDENTIALS_FULL_URI")
"""The variables that choose the endpoint and the account: a client is made again when one changes."""
_CLIENTS_LOCK = threading.Lock()
"""A boto3 session, which makes the clients, is not safe to use from two threads at once."""
os.register_at_fork(after_in_child=lambda: globals().update(_CLIENTS_LOCK=threading.Lock()))  # held by no one


def _settings() -> str:
    """A digest of the AWS variables (the key of a process's clients: no credential kept in it)."""
    return hashlib.sha256(repr([os.environ.get(name) for name in _CLIENT_ENV]).encode()).hexdigest()


class S3Store:
    def __init__(self, bucket: str, prefix: str, retry: Retry | None = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.retry = retry or Retry()
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @staticmethod
    def _shared_client(sign_payload: bool):
        """This process's client of that kind for the current AWS settings (clients do not survive fork).

        Each set of settings gets a session of its own, so a change of
        credentials or endpoint in the environment takes effect (the default
        session would keep the credentials it found first). botocore does
        not retry: `_call` and `S3Reader` (which resumes from the byte it
        reached) do, with `Retry`'s backoff.
        """
        settings = (os.getpid(), _settings())
        key = (*settings, sign_payload)
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                if settings not in _SESSIONS:
                    _SESSIONS[settings] = boto3.session.Session()
                _CLIENTS[key] = S3Store._make_client(_SESSIONS[settings], sign_payload)
            return _CLIENTS[key]

    @staticmethod
    def _make_client(session, sign_payload: bool):
        # checksums when the caller gives one (shards carry their SHA-256) or S3 requires one, not a
        # CRC32 pass over every upload besides
        return session.client("s3", config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60,
            max_pool_connections=16, request_checksum_calculation="when_required",
            s3=None if sign_payload else {"payload_signing_enabled": False}))

    def _client_of_kind(self, sign_payload: bool):
        """The shared client; settings it cannot be made with (a malformed endpoint URL, an AWS profile
        that does not exist, half the credentials) fail at once, naming this store."""
        try:
            return self._shared_client(sign_payload)
        except (BotoCoreError, ValueError) as err:
            why, fix = _diagnose(err, self.bucket, self._endpoint_setting())
            if fix is None:
                why, fix = f"{type(err).__name__}: {_shown(err)}", "Check the AWS settings (AWS_* variables, profile)."
            raise StorageError(f"{self.url}: cannot make an S3 client: {why}. {fix}") from None

    @property
    def _client(self):
        return self._client_of_kind(sign_payload=True)

    @property
    def _checksummed_client(self):
        """For requests whose body's checksum travels in a signed header that S3 checks (a shard's
        SHA-256, a part's CRC32): the client does not hash the body again for the signature, as botocore
        otherwise does over http (a second pass over every byte). See `S3Writer` on the parts."""
        return self._client_of_kind(sign_payload=False)

    @staticmethod
    def _endpoint_setting() -> str:
        variable = _endpoint_variable()
        value = os.environ.get(variable)
        return _shown(value) if value else "AWS's endpoint"

    def _endpoint(self) -> str:
        """The endpoint that requests go to, for messages."""
        try:
            return _shown(self._client.meta.endpoint_url)
        except Exception:  # no client, or a stand-in
            return self._endpoint_setting()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, name: str, action):
        """Run one request, retrying transient failures (server down, reset, 5xx, throttling) with
        `self.retry`'s backoff, saying on stderr what it waits for once the waits pass `QUIET_WAIT` s;
        one that no retry mends (no credentials, access refused, missing bucket) fails at once."""
        url = f"{self.url}/{name}"
        retrying = _Retrying(self.retry, url, what.removesuffix(" of"))
        while True:
            try:
                return action()
            except (ClientError, S3UploadFailedError, BotoCoreError, OSError) as err:
                why, fix = _diagnose(err, self.bucket, self._endpoint())
                if fix is not None:
                    raise StorageError(f"{what} {url} failed: {why}. {fix}") from None
                if not retrying.failed(why):
                    code = _error_code(err)[0]
                    if code in _RESEND:
                        raise StorageError(f"{what} {url} failed after retries: {code}, the bytes did not arrive "
                                           f"intact ({retrying.spent()}). Check the network path to the endpoint, "
                                           "or whether the file changed while it was sent.") from None
                    raise StorageError(f"{what} {url} failed after retries: {why} ({retrying.spent()}). Check "
                                       f"the endpoint ({_endpoint_variable()}) and the network: the server may "
                                       "be down or overloaded.") from None

    def read_bytes(self, name: str) -> bytes:
        return self._call("GET", name, lambda: self._client.get_object(
            Bucket=self.bucket, Key=self._key(name))["Body"].read())

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call("PUT", name, lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data))

    def write_with(self, name: str, fill: Callable[[BinaryIO], object]) -> None:
        """Let `fill` write a local temporary file, then upload it; the object appears only when complete."""
        with tempfile.TemporaryDirectory(prefix=".s3-upload-") as folder:
            path = Path(folder) / "object"
            with open(path, "wb") as f:
                fill(f)
            self.put_file(name, path)

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
        # (an object named as the prefix itself, "prefix/", is a folder marker, not one of its objects)
        return sorted(n for n in names if n), sorted(f for f in folders if f)

    def list(self) -> list[str]:
        return self._listing()[0]

    def list_folders(self) -> list[str]:
        return self._listing()[1]

    def delete(self, name: str) -> None:
        self._call("DELETE", name, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(name)))

    def delete_many(self, names: list[str]) -> None:
        """Remove objects (names may hold `/`) in batch requests of up to 1000 keys, S3's limit;
        missing ones are no error. A key the store refused fails with its name and S3's reason."""
        for first in range(0, len(names), DELETE_BATCH):
            batch = names[first:first + DELETE_BATCH]

            def delete(batch=batch):
                return self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._key(name)} for name in batch], "Quiet": True})
            refused = self._call("DELETE", f"{batch[0]} and {len(batch) - 1} more", delete).get("Errors", [])
            if refused:
                raise StorageError(f"{self.url}: {len(refused)} objects not deleted, e.g. {refused[0].get('Key')}: "
                                   f"{refused[0].get('Code')} {refused[0].get('Message', '')}".rstrip())

    def download(self, name: str, path: Path) -> None:
        """Stream an object to a local file (through a temporary, renamed when complete)."""
        with self.open_reader(name) as reader:
            LocalStore(Path(path).parent).write_with(Path(path).name,
                                                     lambda f: shutil.copyfileobj(reader, f, 1 << 22))

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
    backoff (said on stderr once the waits pass `QUIET_WAIT` s);
    `retry.attempts` failures in a row raise `StorageError` naming the
    object. A missing object or a refused request fails at once.
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
        if self._end is not None and self._pos >= self._end:
            return 0
        view = memoryview(buffer).cast("B")
        retrying = None
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
            except Exception as err:  # connection refused / reset, timeouts, truncated transfer, error answers
                self._close_body()
                code = _error_code(err)[0]
                if code in ("InvalidRange", "416"):  # the object ends before this position (truncated)
                    self._end = self._pos
                    return 0
                if code in _MISSING or code in _CHANGED:
                    what = "does not exist" if code in _MISSING else "changed while it was being read"
                    raise StorageError(f"{self.url} {what} ({code}). Check the endpoint ({_endpoint_variable()}) "
                                       "and that the split's manifest lists what is in the bucket (run the prep "
                                       "again if shards are missing).") from None
                why, fix = _diagnose(err, self._bucket, self._endpoint())
                if fix is not None:
                    raise StorageError(f"reading {self.url} failed: {why}. {fix}") from None
                retrying = retrying or _Retrying(self._retry, self.url, "GET")
                if not retrying.failed(why):
                    raise StorageError(f"reading {self.url} failed {retrying.failures} times in a row at byte "
                                       f"{self._pos} ({why}); the object store stayed unreachable. Check the "
                                       f"endpoint ({_endpoint_variable()}) and the network, then resume from the "
                                       "last checkpoint.") from None
                self.reopened += 1

    def _endpoint(self) -> str:
        try:
            return _shown(self._client.meta.endpoint_url)
        except Exception:
            return S3Store._endpoint_setting()

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
