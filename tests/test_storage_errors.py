"""Object store errors: one that no retry mends fails at once, naming the URL and the fix; a transient one
is retried by one layer (ours), and a wait of more than a few seconds says on stderr what it waits for.

Against the session's SeaweedFS (auth off); a stub only for the refusals that it cannot produce.
"""

import inspect
import sys
import time

import pytest

from data_prep.storage import LocalStore, Retry, S3Reader, S3Store, StorageError, Store, open_store

PROTOCOL = ("url", "read_bytes", "write_bytes", "write_with", "put_file", "open_writer", "discard_unfinished",
            "read_range", "list", "list_folders", "delete", "download", "open_reader")
"""What callers across the repository use on stores (open_store's and LocalStore's)."""


@pytest.fixture
def no_credentials(s3_server, tmp_path, monkeypatch):
    """The session's SeaweedFS as the endpoint, and no credentials anywhere boto3 looks."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "BOTO_CONFIG"):
        monkeypatch.setenv(name, str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def credentials(monkeypatch):
    """Credentials (any: the servers here do not check them) and a region, without a server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


class Stderr:
    """sys.stderr that notes when each line was written."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        self.lines += [(time.monotonic(), line) for line in done]
        return len(text)

    def flush(self) -> None:
        pass

    def waiting(self) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if line.startswith("waiting for ")]


def fails_at_once(action, within: float = 5.0) -> str:
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        action()
    assert time.monotonic() - start < within, f"took {time.monotonic() - start:.1f} s: {info.value}"
    return str(info.value)


def test_missing_credentials_fail_at_once_saying_how_to_set_them(s3_server, bucket, no_credentials):
    s3_server["client"].put_object(Bucket=bucket, Key="d/present.bin", Body=b"bytes")
    store = open_store(f"s3://{bucket}/d")
    for action in (lambda: store.read_bytes("present.bin"), lambda: store.read_range("present.bin", 0, 5),
                   lambda: store.write_bytes("new.bin", b"x"), store.list):
        message = fails_at_once(action)
        assert f"s3://{bucket}/d/" in message and "no credentials found" in message
        assert all(name in message for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"))
    objects = s3_server["client"].list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in objects] == ["d/present.bin"]


def test_half_the_credentials_fail_at_once_without_showing_them(s3_server, bucket, no_credentials, monkeypatch):
    s3_server["client"].put_object(Bucket=bucket, Key="d/present.bin", Body=b"bytes")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDHALFOFTHEPAIR")
    store = open_store(f"s3://{bucket}/d")
    for action in (lambda: store.read_bytes("present.bin"), lambda: store.read_range("present.bin", 0, 5)):
        message = fails_at_once(action)
        assert f"s3://{bucket}/d" in message and "AWS_SECRET_ACCESS_KEY missing" in message
        assert "AKIDHALF" not in message


@pytest.mark.parametrize("how", ["request", "reader"])
def test_a_refused_endpoint_says_what_it_waits_for_then_fails(how, credentials, free_port, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    stderr = Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)

    def read(store):
        return store.read_bytes("obj") if how == "request" else store.read_range("obj", 0, 10)

    # a blip (waits well under 2 s in all) fails quietly
    message = fails_at_once(lambda: read(S3Store("some-bucket", "p", Retry(attempts=3, backoff=0.05))))
    assert stderr.waiting() == [] and "connection refused" in message

    store = S3Store("some-bucket", "p", Retry(attempts=4, backoff=1.0, max_backoff=2.0))
    sent = []
    events = store._client.meta.events  # the process's shared client: unhook after

    def count(**_):
        sent.append(1)
    events.register("before-send.s3.GetObject", count)
    start = time.monotonic()
    try:
        message = fails_at_once(lambda: read(store), within=15)
    finally:
        events.unregister("before-send.s3.GetObject", count)
    waiting = stderr.waiting()
    assert waiting and waiting[0][0] - start < 10
    assert 1 <= len(waiting) <= 3  # at most one line a retry, none for the first ~2 s
    for _, line in waiting:
        assert line.startswith("waiting for s3://some-bucket/p/obj (GET): connection refused")
        assert endpoint in line and "of 4 failed, retrying for up to" in line
    assert len(sent) == 4  # one retry layer: ours, botocore sends each attempt once
    assert "s3://some-bucket/p/obj" in message and "connection refused" in message and endpoint in message
    assert "AWS_ENDPOINT_URL" in message


def test_no_such_bucket_fails_at_once_naming_it(s3_server):
    store = open_store("s3://no-such-bucket-for-errors/p")  # the default retries: 47 s and more if retried
    for action in (lambda: store.read_bytes("obj"), lambda: store.read_range("obj", 0, 10), store.list,
                   lambda: store.discard_unfinished(["obj"])):
        message = fails_at_once(action)
        assert "s3://no-such-bucket-for-errors/p/" in message
        assert "bucket 'no-such-bucket-for-errors' does not exist" in message and "AWS_ENDPOINT_URL" in message
    # SeaweedFS refuses a PUT into a missing bucket (AccessDenied): no retry mends that either
    message = fails_at_once(lambda: store.write_bytes("obj", b"x"))
    assert "AccessDenied" in message and "'no-such-bucket-for-errors'" in message and "credentials" in message


@pytest.mark.parametrize("variable, value", [("AWS_ENDPOINT_URL", "localhost:9000"),
                                             ("AWS_ENDPOINT_URL", "http://127.0.0.1:99999"),
                                             ("AWS_ENDPOINT_URL", "http://user:SeKr1t@127.0.0.1:99999"),
                                             ("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000")])
def test_a_malformed_endpoint_url_fails_at_once_naming_the_variable(variable, value, credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv(variable, value)
    store = S3Store("bucket", "p")

    def write():
        writer = store.open_writer("obj")
        writer.write(b"x")
        writer.commit()
    for action in (lambda: store.read_bytes("obj"), lambda: store.read_range("obj", 0, 10), write):
        message = fails_at_once(action)
        assert "s3://bucket/p" in message and f"{variable}=" in message and "is not valid" in message
        assert "http://HOST:PORT" in message and "SeKr1t" not in message


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_refused_credentials_fail_at_once(code, credentials, monkeypatch):
    """Refusals that SeaweedFS with auth off never gives: a stubbed client answers them."""
    import boto3
    from botocore.stub import Stubber

    client = boto3.session.Session().client("s3", endpoint_url="http://127.0.0.1:1")
    stub = Stubber(client)
    for _ in range(2):
        stub.add_client_error("get_object", service_error_code=code, http_status_code=403)
    with stub:
        monkeypatch.setattr(S3Store, "_client", client)
        store = S3Store("bucket", "p")
        for action in (lambda: store.read_bytes("obj"),
                       lambda: S3Reader(client, "bucket", "p/obj", "s3://bucket/p/obj").read()):
            message = fails_at_once(action)
            assert "s3://bucket/p/obj" in message and code in message and "AWS_ACCESS_KEY_ID" in message
        stub.assert_no_pending_responses()  # one request each: not retried


def test_botocore_does_not_retry(credentials):
    retries = S3Store("bucket", "p")._client.meta.config.retries
    assert retries["total_max_attempts"] == 1


def test_both_stores_have_every_method_of_the_protocol(tmp_path):
    members = {name for name in vars(Store) if not name.startswith("_")} | set(Store.__annotations__)
    assert set(PROTOCOL) <= members
    for store in (LocalStore(tmp_path), S3Store("bucket", "p")):
        assert [name for name in sorted(members) if not hasattr(store, name)] == []
        assert isinstance(store, Store)
        for name in members - {"url"}:
            want = inspect.signature(getattr(Store, name)).parameters
            got = inspect.signature(getattr(type(store), name)).parameters
            assert [(p.name, p.default) for p in got.values()] == [(p.name, p.default) for p in want.values()], \
                f"{type(store).__name__}.{name}"


def test_local_store_lists_folders_deletes_downloads_and_reads_ranges(tmp_path):
    store = LocalStore(tmp_path / "root")
    data = bytes(range(100))
    store.write_bytes("a.bin", data)
    (tmp_path / "root" / "sub").mkdir()
    (tmp_path / "root" / ".hidden").mkdir()
    assert store.list() == ["a.bin"] and store.list_folders() == ["sub"]
    assert LocalStore(tmp_path / "nowhere").list_folders() == []
    with store.open_reader("a.bin", start=10, end=20) as reader:
        assert reader.read(4) == data[10:14] and reader.read() == data[14:20] and reader.read() == b""
    with store.open_reader("a.bin", start=95) as reader:
        assert reader.read() == data[95:]
    assert store.read_range("a.bin", 90, 200) == data[90:]  # fewer bytes from a shorter file
    store.download("a.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == data
    with pytest.raises(StorageError, match="b.bin does not exist"):
        store.download("b.bin", tmp_path / "b.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin", "root"]  # no temporary left
    store.delete("a.bin")
    store.delete("a.bin")  # gone already: as on S3, no error
    assert store.list() == []
    store.write_with("w.bin", lambda f: f.write(b"filled"))
    assert store.read_bytes("w.bin") == b"filled"


def test_s3_store_writes_with_a_fill_and_downloads(s3_server, bucket, tmp_path):
    store = open_store(f"s3://{bucket}/d")
    store.write_with("w.bin", lambda f: f.write(b"filled"))
    assert store.read_bytes("w.bin") == b"filled"
    store.download("w.bin", tmp_path / "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == b"filled"
    store.delete("w.bin")
    assert store.list() == []
