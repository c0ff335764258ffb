"""`vdvae prep`: CIFAR-10 to deterministic webdataset shards plus a manifest, resumable."""

import json
import os
import subprocess

import numpy as np
import pytest
import webdataset as wds

from data_prep import cifar10
from data_prep.prep import prep
from data_prep.source import SourceError
from data_prep.storage import StorageError
from launch.cli import main as cli_main

from conftest import NUM_TEST


def test_cifar10_split_is_scikit_learns():
    from sklearn.model_selection import train_test_split

    train, valid = train_test_split(np.arange(50_000), test_size=5000, random_state=11172018)
    ours_train, ours_valid = cifar10.split_indices()
    assert np.array_equal(ours_train, train) and np.array_equal(ours_valid, valid)


def read_split(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    return manifest, samples


def test_prep_writes_the_official_splits(cifar_src, tmp_path):
    src, images = cifar_src
    prep("cifar10", src, str(tmp_path / "out"), samples_per_shard=700, progress=False)
    train_x = np.concatenate([images[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((images[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    tr, va = cifar10.split_indices(len(train_x))
    for split, indices, xs, ys in [("train", tr, train_x, train_y), ("valid", va, train_x, train_y),
                                   ("test", np.arange(NUM_TEST), *images["test_batch"])]:
        manifest, samples = read_split(tmp_path / "out" / split)
        assert manifest["num_samples"] == len(indices) == len(samples)
        assert [s["count"] for s in manifest["shards"]] == [min(700, len(indices) - i) for i in range(0, len(indices), 700)]
        assert [s["json"]["index"] for s in samples] == [int(i) for i in indices]  # order kept
        for s in samples[:50]:
            i = s["json"]["index"]
            assert np.array_equal(s["png"], xs[i]) and s["cls"] == ys[i]
            assert (s["json"]["width"], s["json"]["height"], s["json"]["source"]) == (32, 32, "cifar10")
        assert manifest["resolution"] == 32 and manifest["bits"] == 8
        assert ("test_batch" if split == "test" else "random_state=11172018") in manifest["how"]
        pixels = xs[indices].reshape(-1, 3).astype(np.float64)
        assert np.allclose(manifest["channel_mean"], pixels.mean(0), atol=1e-4)
        assert np.allclose(manifest["channel_std"], pixels.std(0), atol=1e-3)
    listing = subprocess.run(["tar", "-tf", str(tmp_path / "out/test/test-000000.tar")],
                             capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["test0000000.png", "test0000000.json", "test0000000.cls"]


def test_reruns_are_byte_identical_and_resume_only_what_is_missing(cifar_src, tmp_path):
    src, _ = cifar_src
    a, b = tmp_path / "a", tmp_path / "b"
    prep("cifar10", src, str(a), samples_per_shard=1000, progress=False)
    prep("cifar10", src, str(b), samples_per_shard=1000, workers=2, progress=False)
    for split in ("train", "valid", "test"):
        assert (a / split / "manifest.json").read_bytes() == (b / split / "manifest.json").read_bytes()
        for shard in (a / split).glob("*.tar"):
            assert shard.read_bytes() == (b / split / shard.name).read_bytes()
    # an interrupted run: a shard that never got its record, one missing, no manifest
    valid = b / "valid"
    reference = (valid / "manifest.json").read_bytes()
    (valid / "manifest.json").unlink()
    (valid / "valid-000002.done.json").unlink()
    (valid / "valid-000003.tar").unlink()
    (valid / "valid-000001.tar").write_bytes(b"half a shard")  # killed mid-upload: no record yet
    (valid / "valid-000001.done.json").unlink()
    stamp = (valid / "valid-000000.tar").stat().st_mtime_ns
    prep("cifar10", src, str(b), samples_per_shard=1000, progress=False)
    assert (valid / "manifest.json").read_bytes() == reference
    assert (valid / "valid-000000.tar").stat().st_mtime_ns == stamp  # done shards are not redone
    for shard in (a / "valid").glob("*.tar"):
        assert shard.read_bytes() == (valid / shard.name).read_bytes()


def test_other_options_are_refused_unless_overwrite(cifar_src, tmp_path):
    src, _ = cifar_src
    prep("cifar10", src, str(tmp_path), samples_per_shard=1000, progress=False)
    with pytest.raises(SourceError, match="--overwrite"):
        prep("cifar10", src, str(tmp_path), samples_per_shard=900, progress=False)
    prep("cifar10", src, str(tmp_path), samples_per_shard=900, overwrite=True, progress=False)
    manifest, samples = read_split(tmp_path / "test")
    assert [s["count"] for s in manifest["shards"]] == [100] and len(samples) == 100


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("empty", "not the CIFAR-10 python release"),
    ("foreign", "not the CIFAR-10 python release"),
])
def test_bad_sources_fail_before_any_work(tmp_path, kind, message):
    src = tmp_path / "src"
    if kind != "missing":
        src.mkdir()
    if kind == "foreign":  # some other dataset's files
        (src / "train_data_batch_1").write_text("x")
    with pytest.raises(SourceError, match=message):
        prep("cifar10", src, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_batch_file_is_named(cifar_src, tmp_path):
    src, _ = cifar_src
    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    for f in (src / "cifar-10-batches-py").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "data_batch_3").write_bytes((bad / "data_batch_3").read_bytes()[:1000])
    with pytest.raises(SourceError, match="data_batch_3: not a readable CIFAR-10 batch"):
        prep("cifar10", tmp_path, str(tmp_path / "out"), progress=False)


def test_prep_command(cifar_src, tmp_path, capsys):
    src, _ = cifar_src
    assert cli_main(["prep", "cifar10", "--src", str(src), "--out", str(tmp_path / "o"),
                     "--samples-per-shard", "2000"]) == 0
    out = capsys.readouterr().out
    assert "cifar10/valid: 5000 samples in 3 shards" in out
    assert cli_main(["prep", "cifar10", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_prep_to_s3_resumes_and_matches_local(cifar_src, tmp_path, bucket, s3_server):
    """A real SeaweedFS S3 server: the same shards as a local run; a rerun adds only what is missing."""
    src, _ = cifar_src
    prep("cifar10", src, str(tmp_path / "local"), samples_per_shard=1000, progress=False)
    url = f"s3://{bucket}/cifar10"
    prep("cifar10", src, url, samples_per_shard=1000, workers=2, progress=False)
    client = s3_server["client"]

    def get(key):
        return client.get_object(Bucket=bucket, Key=f"cifar10/{key}")["Body"].read()

    for split in ("train", "valid", "test"):
        assert get(f"{split}/manifest.json") == (tmp_path / "local" / split / "manifest.json").read_bytes()
    for shard in (tmp_path / "local" / "valid").glob("*.tar"):
        assert get(f"valid/{shard.name}") == shard.read_bytes()
    client.delete_object(Bucket=bucket, Key="cifar10/valid/valid-000004.tar")
    client.delete_object(Bucket=bucket, Key="cifar10/valid/manifest.json")
    # a committed shard (object + record) is verified against its record: a damaged one is rebuilt
    client.put_object(Bucket=bucket, Key="cifar10/valid/valid-000000.tar", Body=b"marker")
    prep("cifar10", src, url, samples_per_shard=1000, progress=False)
    assert get("valid/manifest.json") == (tmp_path / "local" / "valid" / "manifest.json").read_bytes()
    assert get("valid/valid-000004.tar") == (tmp_path / "local" / "valid" / "valid-000004.tar").read_bytes()
    assert get("valid/valid-000000.tar") == (tmp_path / "local" / "valid" / "valid-000000.tar").read_bytes()


def test_s3_errors_name_the_object_not_the_credentials(s3_server, tmp_path, cifar_src, monkeypatch):
    src, _ = cifar_src
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Sekr1tValueThatMustNotLeak")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDMUSTNOTLEAK")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/x/train.*AWS_ENDPOINT_URL") as info:
        prep("cifar10", src, "s3://no-such-bucket-here/x", progress=False)
    assert "Sekr1t" not in str(info.value) and "AKIDMUSTNOTLEAK" not in str(info.value)


def test_s3_checks_an_upload_against_the_sha256_given(s3_server, bucket, tmp_path):
    import hashlib

    from data_prep.storage import Retry, open_store

    store = open_store(f"s3://{bucket}/checked")
    store.retry = Retry(attempts=2, backoff=0.01)
    path = tmp_path / "shard.tar"
    path.write_bytes(b"samples" * 1000)
    sent = []

    def record(request, **_):
        sent.append(request.headers)
    events = store._checksummed_client.meta.events  # the process's shared client: unhook after
    events.register("before-send.s3.PutObject", record)
    try:
        store.put_file("good.tar", path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    finally:
        events.unregister("before-send.s3.PutObject", record)
    assert store.read_bytes("good.tar") == path.read_bytes()
    # the body's SHA-256 is in a signed header, so the signature need not hash the body again
    signed = sent[0]["Authorization"].decode().split("SignedHeaders=")[1].split(",")[0].split(";")
    assert "x-amz-checksum-sha256" in signed and sent[0]["X-Amz-Content-SHA256"] == b"UNSIGNED-PAYLOAD"
    with pytest.raises(StorageError, match=r"checked/bad.tar failed after retries: BadDigest, the bytes did not"):
        store.put_file("bad.tar", path, sha256=hashlib.sha256(b"other bytes").hexdigest())
    assert store.list() == ["good.tar"]  # nothing stored under the name


def test_s3_writer_streams_parts_commits_whole_objects_and_aborts_cleanly(s3_server, bucket):
    import hashlib

    from data_prep.storage import PART_BYTES, Retry, open_store

    client = s3_server["client"]
    store = open_store(f"s3://{bucket}/w")
    store.retry = Retry(attempts=2, backoff=0.01)
    data = os.urandom(PART_BYTES) + os.urandom(PART_BYTES // 2)
    writer = store.open_writer("big.tar")
    for i in range(0, len(data), 1 << 20):
        writer.write(data[i:i + (1 << 20)])
    assert store.list() == []  # parts sent, nothing visible before the commit
    writer.commit(sha256=hashlib.sha256(data).hexdigest())
    assert store.read_bytes("big.tar") == data
    assert client.head_object(Bucket=bucket, Key="w/big.tar")["ETag"].endswith('-2"')

    writer = store.open_writer("dropped.tar")
    writer.write(data)
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]] == ["w/dropped.tar"]
    writer.abort()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    small = store.open_writer("small.tar")  # never fills a part: one PUT at commit, checked against its SHA-256
    small.write(b"samples" * 100)
    with pytest.raises(StorageError, match="BadDigest"):
        small.commit(sha256=hashlib.sha256(b"other bytes").hexdigest())
    small.abort()
    assert store.list() == ["big.tar"]


def test_s3_without_permission_to_list_unfinished_uploads_warns_and_goes_on(monkeypatch):
    """An IAM policy without s3:ListBucketMultipartUploads (SeaweedFS with auth off cannot refuse it):
    the prep warns that stale uploads stay, and builds its shards."""
    from botocore.exceptions import ClientError

    from data_prep.storage import Retry, S3Store

    class Refusing:
        def __init__(self, code):
            self.code = code

        def get_paginator(self, operation):
            raise ClientError({"Error": {"Code": self.code}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                              "ListMultipartUploads")

    store = S3Store("bucket", "x", retry=Retry(attempts=2, backoff=0.01))
    monkeypatch.setattr(S3Store, "_client", Refusing("AccessDenied"))
    with pytest.warns(UserWarning, match="s3:ListBucketMultipartUploads"):
        assert store.discard_unfinished(["train-000000.tar"]) == 0
    monkeypatch.setattr(S3Store, "_client", Refusing("NoSuchBucket"))  # any other refusal still stops the prep
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.discard_unfinished(["train-000000.tar"])
