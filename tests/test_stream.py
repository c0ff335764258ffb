"""The shard stream, on shards made by `vdvae prep`, from a local folder and from a real SeaweedFS."""

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.prep import prep
from data_prep.storage import LocalStore, Retry, StorageError
from model import VDVAE
from data_prep.shards import ManifestError, Split, parse_tar
from pipeline.stream import Batch, ShardStream, StreamError
from services import CuttingProxy, SeaweedFS

RES = 8


def make_folder(root: Path, count: int) -> Path:
    rng = np.random.default_rng(count)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(root / f"img{i:04d}.png")
    return root


def make_split(tmp: Path, out: str, count: int = 60, per_shard: int = 7, num_valid: int = 10) -> str:
    src = make_folder(tmp / f"src{count}", count + num_valid)
    prep("folder", src, out, samples_per_shard=per_shard, resolution=RES, num_valid=num_valid, progress=False)
    return out


def keys(batches) -> list[list[str]]:
    return [b.keys for b in batches]


def epoch(stream: ShardStream) -> list[Batch]:
    return list(stream)


_buckets = iter(range(10**6))


@pytest.fixture(params=["local", "s3"])
def out_root(request, tmp_path):
    """Where a test's split goes: a local folder, or a fresh bucket on the session's SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("s3_server")
    name = f"stream-{next(_buckets)}-{request.node.name[:20].lower().replace('_', '-').strip('-[')}"
    server["client"].create_bucket(Bucket=name)
    return f"s3://{name}/ds"


@pytest.fixture(scope="module")
def split_local(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    return make_split(tmp, str(tmp / "out"))


@pytest.fixture(scope="module")
def split_s3(tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("split-s3")
    s3_server["client"].create_bucket(Bucket="stream-shared")
    return make_split(tmp, "s3://stream-shared/ds")


@pytest.fixture(scope="module", params=["local", "s3"])
def local_split(request):
    """One split for several tests, in a local folder and on the session's SeaweedFS."""
    return request.getfixturevalue(f"split_{request.param}")


def test_manifest_errors(tmp_path, local_split):
    with pytest.raises(ManifestError, match="manifest.json does not exist"):
        Split.load(str(tmp_path))
    split = Split.load(local_split + "/train/manifest.json")
    assert split.num_samples == 60 and split.resolution == RES and len(split.shards) == 9
    with pytest.raises(StreamError, match="cannot give every one of 8 ranks a batch of 8"):
        ShardStream(local_split + "/train", 8, rank=0, world=8)
    with pytest.raises(StreamError, match="multiple of batch_size"):
        ShardStream(local_split + "/train", 4, piece_samples=6)


@pytest.mark.parametrize("per_shard", [7, 60, 200])
def test_every_rank_yields_the_same_number_of_batches(tmp_path, out_root, per_shard):
    """Shards of 7 and one shard of 60: fewer shards than readers (3 ranks x 2 workers) included."""
    url = make_split(tmp_path, out_root, per_shard=per_shard) + "/train"
    for world, workers, batch in [(1, 0, 4), (2, 2, 4), (3, 2, 5), (4, 3, 3)]:
        per_rank = [epoch(ShardStream(url, batch, rank=r, world=world, workers=workers, piece_samples=batch * 2))
                    for r in range(world)]
        counts = {len(batches) for batches in per_rank}
        assert counts == {60 // (world * batch)}, (world, workers, batch, counts)
        seen = [k for batches in per_rank for b in batches for k in b.keys]
        assert len(seen) == len(set(seen)) == 60 // (world * batch) * world * batch
        assert all(b.images.shape == (batch, RES, RES, 3) and b.images.dtype == torch.uint8
                   for batches in per_rank for b in batches)


def test_same_seed_same_batches_other_seed_or_epoch_other_order(local_split):
    url = local_split + "/train"
    a = ShardStream(url, 4, seed=3, workers=2)
    first, second = keys(epoch(a)), keys(epoch(a))
    assert first == keys(epoch(ShardStream(url, 4, seed=3)))
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    assert first != keys(epoch(ShardStream(url, 4, seed=4)))
    # pixels and labels travel with their keys
    b0, b1 = epoch(ShardStream(url, 4, seed=3))[0], epoch(ShardStream(url, 4, seed=3, workers=3))[0]
    assert torch.equal(b0.images, b1.images) and b0.keys == b1.keys


@pytest.mark.parametrize(("where", "workers_after"), [("local", 0), ("local", 1), ("local", 2), ("local", 3), ("s3", 2)])
def test_resume_is_exact(request, where, workers_after):
    """Every worker count after the resume in a local folder; on S3 once, with workers (the cursor does not depend
    on the store)."""
    url = request.getfixturevalue(f"split_{where}") + "/train"
    reference = ShardStream(url, 4, seed=7, workers=2, piece_samples=8)
    per_epoch = reference.batches_per_epoch
    full = [b for _, b in zip(range(3 * per_epoch), reference.forever(), strict=False)]
    for stop in [0, 1, 5, per_epoch - 1, per_epoch, per_epoch + 3]:
        first = ShardStream(url, 4, seed=7, workers=2, piece_samples=8)
        head = [b for _, b in zip(range(stop), first.forever(), strict=False)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = ShardStream(url, 4, seed=7, workers=workers_after, piece_samples=8)
        resumed.load_state_dict(state)
        tail = [b for _, b in zip(range(len(full) - stop), resumed.forever(), strict=False)]
        assert keys(head + tail) == keys(full), stop
        assert all(torch.equal(x.images, y.images) for x, y in zip(head + tail, full, strict=True))
    with pytest.raises(StreamError, match="seed 7 -> 8"):  # (another batch or world size is allowed)
        ShardStream(url, 4, seed=8, piece_samples=8).load_state_dict(state)


def _global_steps(url: str, world: int, batch: int, steps: int, state: dict | None = None,
                  workers: int = 0) -> tuple[list[list[str]], dict]:
    """`steps` micro-batches of `world` ranks together: each step's keys in rank order; the cursor after."""
    streams = [ShardStream(url, batch, rank=r, world=world, seed=3, workers=workers, piece_samples=batch * 2)
               for r in range(world)]
    for stream in streams:
        if state is not None:
            stream.load_state_dict(state)
    batches = [stream.forever() for stream in streams]
    got = [[k for it in batches for k in next(it).keys] for _ in range(steps)]
    cursors = [stream.state_dict() for stream in streams]
    assert all({k: v for k, v in c.items() if k != "skipped"} == {k: v for k, v in cursors[0].items()
                                                                  if k != "skipped"} for c in cursors)
    return got, dict(cursors[0], skipped=sum(c["skipped"] for c in cursors))


def test_the_order_is_global_and_a_cursor_resumes_on_other_world_sizes(tmp_path):
    """60 samples, 9 shards. A cursor carries a job's position to any world and batch size: with the
    global batch kept, the very same global batches; with another, every sample left in the epoch
    exactly once, then the same next epoch."""
    url = make_split(tmp_path, str(tmp_path / "out")) + "/train"
    reference, _ = _global_steps(url, 1, 8, 21)  # 7 global batches of 8 an epoch, 4 samples left over
    first, cursor = _global_steps(url, 2, 4, 3)
    assert json.loads(json.dumps(cursor)) == cursor and cursor["consumed"] == 24 and "world" not in cursor
    second, cursor = _global_steps(url, 1, 8, 5, cursor, workers=2)  # into epoch 1
    third, _ = _global_steps(url, 4, 2, 13, cursor)
    assert [sorted(b) for b in first + second + third] == [sorted(b) for b in reference]
    assert first[0] != sorted(first[0])  # ranks take different stretches of a global batch
    # the global batch halved after 3 steps: the 36 samples left of epoch 0, each once, then epoch 1
    _, cursor = _global_steps(url, 2, 4, 3)
    halved, _ = _global_steps(url, 2, 2, 9 + 15, cursor)
    before = {k for b in first for k in b}
    after = [k for b in halved[:9] for k in b]
    assert len(after) == len(set(after)) == 36 and len(before | set(after)) == 60
    epoch1 = sorted(k for b in reference[7:14] for k in b)
    assert sorted(k for b in halved[9:9 + 14] for k in b) == epoch1  # 14 batches of 4 = 56: the same 56
    # doubled, on 3 ranks: the 36 left (3 global batches of 12), then epoch 1, whole (5 of 12)
    doubled, _ = _global_steps(url, 3, 4, 3 + 5, cursor)
    after = [k for b in doubled[:3] for k in b]
    assert len(after) == len(set(after)) == 36 and len(before | set(after)) == 60
    epoch1 = [k for b in doubled[3:] for k in b]
    assert len(epoch1) == len(set(epoch1)) == 60


def test_many_ranks_read_at_most_about_twice_the_bytes_they_keep(tmp_path, monkeypatch):
    """64 ranks of batch 1 over one shard of 128 samples of 12 KB: more ranks than the order has
    lanes, so ranks' samples interleave, a few samples apart (under the 1 MB read-through). Reading
    every such gap through fetched 5.3 times the bytes kept here; now at most 2."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(138):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"img{i:04d}.png")
    prep("folder", src, str(tmp_path / "out"), samples_per_shard=128, resolution=64, num_valid=10, progress=False)
    url = str(tmp_path / "out" / "train")
    read = []
    real = LocalStore.read_range
    monkeypatch.setattr(LocalStore, "read_range", lambda self, name, start, end, retry=None:
                        read.append(end - start) or real(self, name, start, end, retry))
    kept = 0
    for rank in range(64):
        stream = ShardStream(url, 1, rank=rank, world=64, seed=1)
        kept += sum(len(b.keys) for b in epoch(stream))
    shard = Split.load(url).shards[0]
    sample_bytes = shard.size / shard.count
    assert kept == 128  # every sample kept once
    assert sum(read) <= 2 * kept * sample_bytes, (sum(read), kept * sample_bytes)


def test_eval_covers_every_sample_once_with_a_correct_mean(local_split):
    url = local_split + "/train"
    everything = [k for b in epoch(ShardStream(url, 1, train=False)) for k in b.keys]
    assert len(everything) == 60
    for world, batch in [(1, 7), (3, 7), (4, 16), (7, 4)]:
        streams = [ShardStream(url, batch, rank=r, world=world, train=False, workers=1) for r in range(world)]
        per_rank = [epoch(s) for s in streams]
        assert len({len(b) for b in per_rank}) == 1  # the same number of forward passes everywhere
        valid = [k for batches in per_rank for b in batches for k, v in zip(b.keys, b.valid, strict=True) if v]
        assert sorted(valid) == sorted(everything)
        # the masked mean over uneven last batches equals the plain mean over the split
        total = sum(float((b.images.float().mean((1, 2, 3)) * b.valid).sum()) for bs in per_rank for b in bs)
        count = sum(int(b.valid.sum()) for bs in per_rank for b in bs)
        plain = torch.cat([b.images.float().mean((1, 2, 3)) for b in epoch(ShardStream(url, 1, train=False))])
        assert count == 60 and total / count == pytest.approx(float(plain.mean()), rel=1e-6)


@pytest.mark.parametrize("bits, shift, scale, divisor", [(5, -112.8666757481, 1 / 69.84780273, 1.0),
                                                         (8, -0.4387, 1 / 0.2743, 255.0)])
def test_preprocessing_on_the_device_matches_hand_computed_values(local_split, tiny_config, bits, shift, scale,
                                                                  divisor):
    """ffhq256 (5-bit targets) and ffhq1024 ([0, 1] inputs) constants on the stream's uint8 batches."""
    from dataclasses import replace

    model = VDVAE(replace(tiny_config, bits=bits, input_shift=shift, input_scale=scale, input_divisor=divisor))
    batch = epoch(ShardStream(local_split + "/train", 4))[0].to("cpu")
    inp, target = model.preprocess(batch.images)
    v = batch.images[1, 2, 3].double()  # (3,) one pixel, by hand
    if divisor == 1.0:
        want_inp, want_target = (v + shift) * scale, (torch.floor(v / 8) * 8 - 127.5) / 127.5
    else:
        want_inp, want_target = (v / 255 + shift) * scale, (v / 255 - 0.5) * 2
    assert torch.allclose(inp[1, :, 2, 3].double(), want_inp, atol=1e-5)
    assert torch.allclose(target[1, 2, 3].double(), want_target, atol=1e-6)


def _corrupt(tmp_path) -> tuple[str, str, int]:
    """A split with one PNG overwritten with garbage and one shard cut in the middle of a sample."""
    url = make_split(tmp_path, str(tmp_path / "out"), per_shard=10) + "/train"
    manifest = json.loads(Path(url, "manifest.json").read_text())
    shard0, shard3 = (Path(url, manifest["shards"][i]["name"]) for i in (0, 3))
    data = bytearray(shard0.read_bytes())
    start = manifest["shards"][0]["offsets"][4] + 512  # sample 4's PNG bytes
    data[start + 8:start + 40] = b"\xff" * 32
    shard0.write_bytes(bytes(data))
    cut = manifest["shards"][3]["offsets"][6] + 700  # samples 6..9 of shard 3 lost
    shard3.write_bytes(shard3.read_bytes()[:cut])
    bad_key = next(k for k, _ in parse_tar(bytes(data[manifest["shards"][0]["offsets"][4]:])))
    return url, bad_key, 1 + 4


@pytest.mark.parametrize("where", ["local", "s3"])
def test_corrupt_png_and_truncated_shard_are_skipped_and_counted(tmp_path, where, request):
    url, bad_key, bad = _corrupt(tmp_path)
    if where == "s3":  # the same damaged split, served by SeaweedFS
        client = request.getfixturevalue("s3_server")["client"]
        client.create_bucket(Bucket="stream-damaged")
        for path in Path(url).iterdir():
            client.upload_file(str(path), "stream-damaged", f"ds/train/{path.name}")
        url = "s3://stream-damaged/ds/train"
    for world in (1, 2):
        streams = [ShardStream(url, 5, rank=r, world=world, workers=2, seed=1) for r in range(world)]
        per_rank = [epoch(s) for s in streams]
        assert {len(b) for b in per_rank} == {60 // (world * 5)}
        assert all(b.valid.all() and len(b) == 5 for bs in per_rank for b in bs)  # rows refilled
        assert sum(s.skipped for s in streams) == bad
        assert sum(b.skipped for bs in per_rank for b in bs) == bad
        assert bad_key not in {k for bs in per_rank for b in bs for k in b.keys}
    evals = [ShardStream(url, 4, rank=r, world=2, train=False) for r in range(2)]
    rows = [(k, bool(v)) for s in evals for b in epoch(s) for k, v in zip(b.keys, b.valid, strict=True)]
    assert sum(1 for k, v in rows if k and not v) == bad and (bad_key, False) in rows
    assert sum(v for _, v in rows) == 60 - bad


def test_a_piece_with_nothing_readable_is_filled_from_later_pieces(tmp_path):
    url = make_split(tmp_path, str(tmp_path / "out"), per_shard=10) + "/train"
    first = Split.load(url).shards[0]
    Path(url, first.name).write_bytes(b"")  # a shard emptied: its pieces have no readable sample
    stream = ShardStream(url, 5, piece_samples=5, seed=2, workers=2)
    batches = epoch(stream)
    assert len(batches) == 12 and all(b.valid.all() and len(b) == 5 for b in batches)
    assert stream.skipped == 10 == sum(b.skipped for b in batches)
    assert not any(k.startswith(first.name) for b in batches for k in b.keys)


def test_stock_webdataset_reads_s3_shards_through_our_opener(tmp_path, bucket):
    import webdataset as wds

    url = make_split(tmp_path, f"s3://{bucket}/ds") + "/train"
    split = Split.load(url)
    samples = list(wds.WebDataset(f"{url}/{split.shards[1].name}", shardshuffle=False))
    assert len(samples) == split.shards[1].count and samples[0]["png"].startswith(b"\x89PNG")


def test_s3_equals_local(tmp_path, bucket):
    local = make_split(tmp_path, str(tmp_path / "local")) + "/train"
    s3 = make_split(tmp_path, f"s3://{bucket}/ds") + "/train"
    a, b = epoch(ShardStream(local, 4, world=2, rank=1, workers=2)), epoch(ShardStream(s3, 4, world=2, rank=1))
    assert keys(a) == keys(b) and all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))


def test_broken_transfers_resume_from_the_byte_reached(tmp_path, bucket, s3_server):
    url = make_split(tmp_path, f"s3://{bucket}/ds", count=300, per_shard=300) + "/train"
    split = Split.load(url)
    reference = epoch(ShardStream(url, 10, piece_samples=300))
    port = int(s3_server["endpoint"].rsplit(":", 1)[1])
    proxy = CuttingProxy(port, after=30_000, cuts=3)  # the shard is ~300 KB: three resets mid-GET
    # the stream's own proxy: a client keeps its connections open, and the proxy cuts new connections only
    stream_proxy = CuttingProxy(port, after=30_000, cuts=2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            from data_prep.storage import open_store

            reader = open_store(url).open_reader(split.shards[0].name, Retry(attempts=5, backoff=0.05))
            data = reader.read()
            assert reader.reopened == 3 and proxy.cut == 3
            direct = s3_server["client"].get_object(Bucket=bucket, Key=f"ds/train/{split.shards[0].name}")
            assert data == direct["Body"].read()
            mp.setenv("AWS_ENDPOINT_URL", stream_proxy.endpoint)
            again = epoch(ShardStream(url, 10, piece_samples=300, retry=Retry(attempts=5, backoff=0.05)))
        # (a cut connection may carry only small replies)
        assert keys(again) == keys(reference) and stream_proxy.cut > 0
        assert all(torch.equal(x.images, y.images) for x, y in zip(again, reference, strict=True))
    finally:
        proxy.close()
        stream_proxy.close()


def test_server_down_for_10_seconds_mid_stream(tmp_path):
    server = SeaweedFS(tmp_path / "weed")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in server.env.items():
                mp.setenv(k, v)
            server.client().create_bucket(Bucket="outage")
            url = make_split(tmp_path, "s3://outage/ds") + "/train"
            reference = keys(epoch(ShardStream(url, 2, piece_samples=2, seed=5)))
            stream = ShardStream(url, 2, piece_samples=2, seed=5, workers=1, retry=Retry(attempts=12, backoff=0.5))
            got, down = [], None
            for batch in stream:
                got.append(batch.keys)
                if len(got) == 5:
                    server.stop()
                    down = time.monotonic()
                    threading.Timer(10.0, server.start).start()
            assert down is not None and time.monotonic() - down >= 10.0
            assert got == reference
            assert Counter(k for b in got for k in b) == Counter(k for b in reference for k in b)
    finally:
        time.sleep(0.5)
        server.stop()


def test_a_missing_shard_fails_at_once_naming_it(tmp_path, bucket, s3_server):
    url = make_split(tmp_path, f"s3://{bucket}/ds") + "/train"
    split = Split.load(url)
    s3_server["client"].delete_object(Bucket=bucket, Key=f"ds/train/{split.shards[2].name}")
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"{split.shards[2].name} does not exist"):
        epoch(ShardStream(url, 4, train=False, workers=2))
    assert time.monotonic() - start < 20


def test_an_unreachable_store_fails_after_the_retries(tmp_path, local_split, free_port):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "test")  # (credentials: a refused connection is what is tested)
        mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
        from data_prep.storage import S3Store

        with pytest.raises(StorageError, match="failed 3 times in a row"):
            S3Store("b", "p").read_range("train-000000.tar", 0, 100, Retry(attempts=3, backoff=0.01))


def test_parse_tar_stops_at_a_cut_member(tmp_path):
    from data_prep.shards import Sample, ShardWriter

    path = tmp_path / "s.tar"
    with ShardWriter(path) as w:
        for i in range(3):
            w.add(Sample(f"k{i}", bytes(1000), {"i": i}, i))
    data = path.read_bytes()
    assert [k for k, _ in parse_tar(data)] == ["k0", "k1", "k2"]
    got = []
    with pytest.raises(ValueError, match="cut short"):
        for key, fields in parse_tar(data[: w.offsets[2] + 600]):
            got.append((key, sorted(fields)))
    assert got == [("k0", ["cls", "json", "png"]), ("k1", ["cls", "json", "png"])]
