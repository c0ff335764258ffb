"""The checkpoint mirror on a real SeaweedFS S3: each rank uploads its own files in the background,
`latest` only once every rank's are up, batch-deleted pruning, a crash mid-upload leaves `latest` on
the previous complete checkpoint. (The mirror inside a 2-rank training run: tests/test_train.py.)"""

from pathlib import Path

from data_prep.storage import open_store
from pipeline.checkpoint import UPLOADED, Mirror, owner_rank


def _checkpoint(root: Path, step: int, world: int = 2, large: bool = False) -> Path:
    folder = root / f"global_step{step}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"model %d" % step)
    for rank in range(world):
        size = 9 << 20 if large and rank == 1 else 100  # over the single-PUT limit: multipart
        (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([rank]) * size)
        (folder / f"ema_rank{rank:05d}.pt").write_bytes(b"ema %d %d" % (rank, step))
    return folder


def _keys(s3_server, bucket: str) -> set[str]:
    pages = s3_server["client"].get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_owner_rank():
    assert owner_rank("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert owner_rank("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert owner_rank("zero_pp_rank_1_mp_rank_00_model_states.pt") == 1  # ZeRO-3's per-rank model states
    assert owner_rank("ema_rank00002.pt") == 2
    assert owner_rank("mp_rank_00_model_states.pt") == 0


def test_each_rank_uploads_its_files_and_latest_waits_for_all(s3_server, bucket, tmp_path):
    url = f"s3://{bucket}/runs/m"
    ranks = [Mirror(url, rank, 2, keep=1, wait_s=60) for rank in range(2)]
    for step in (2, 4):
        folder = _checkpoint(tmp_path, step, large=step == 4)
        ranks[0].start_upload(folder)  # rank 0 first: its commit must wait for rank 1's files
        if step == 4:  # rank 1 has not started: rank 0's commit is waiting for it
            assert open_store(url).read_bytes("latest") == b"global_step2"
        ranks[1].start_upload(folder)
        assert all(m.wait(60) for m in ranks) and all(m.failure is None for m in ranks)
        assert open_store(url).read_bytes("latest") == f"global_step{step}".encode()
    keys = _keys(s3_server, bucket)
    assert {k.removeprefix("runs/m/global_step4/") for k in keys if k.startswith("runs/m/global_step4/")} == {
        p.name for p in (tmp_path / "global_step4").iterdir()}
    assert not any("global_step2" in k for k in keys)  # pruned (keep=1), its markers too
    assert {k for k in keys if k.startswith(f"runs/m/{UPLOADED}/")} == {
        f"runs/m/{UPLOADED}/global_step4/rank00000", f"runs/m/{UPLOADED}/global_step4/rank00001"}
    # and a lost run folder comes back from it
    assert ranks[0].download(tmp_path / "restored") == "global_step4"
    assert (tmp_path / "restored" / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes() == \
        (tmp_path / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes()


def test_a_rank_lost_mid_upload_leaves_latest_on_the_previous_checkpoint(s3_server, bucket, tmp_path, capsys):
    url = f"s3://{bucket}/runs/c"
    ranks = [Mirror(url, rank, 2, keep=1, wait_s=2) for rank in range(2)]
    folder = _checkpoint(tmp_path, 2)
    for mirror in ranks:
        mirror.start_upload(folder)
    assert all(m.wait(60) for m in ranks)
    # step 4: rank 1 dies after its first file (its thread ends without its marker)
    folder = _checkpoint(tmp_path, 4)
    store = open_store(f"{url}/global_step4")
    store.put_file("ema_rank00001.pt", folder / "ema_rank00001.pt")
    ranks[0].start_upload(folder)
    assert ranks[0].wait(60)
    assert "only 1 of 2 ranks uploaded global_step4" in ranks[0].failure
    assert "was not mirrored" in capsys.readouterr().err
    assert open_store(url).read_bytes("latest") == b"global_step2"
    keys = _keys(s3_server, bucket)
    assert {k.removeprefix("runs/c/global_step2/") for k in keys if k.startswith("runs/c/global_step2/")} == {
        p.name for p in (tmp_path / "global_step2").iterdir()}  # the complete one is kept whole
    assert ranks[0].download(tmp_path / "restored") == "global_step2"


def test_delete_many_in_batches(s3_server, bucket, monkeypatch):  # more keys than one request takes
    import data_prep.storage

    monkeypatch.setattr(data_prep.storage, "DELETE_BATCH", 10)  # (S3's 1000, scaled down)
    store = open_store(f"s3://{bucket}/many")
    names = [f"d/{i:05d}" for i in range(25)]
    for name in names + ["kept"]:
        store.write_bytes(name, b"x")
    calls = []
    original = store._client.delete_objects
    monkeypatch.setattr(store._client, "delete_objects", lambda **kw: calls.append(kw) or original(**kw))
    store.delete_many(names + ["d/never-there"])
    assert _keys(s3_server, bucket) == {"many/kept"}
    assert [len(c["Delete"]["Objects"]) for c in calls] == [10, 10, 6]
