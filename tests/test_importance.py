"""The importance-weighted bound: sampled log-densities, the K-sample bound over a split, ranks, the CLI.

Run as a script (`test_importance.py WORLD RANK PORT DATA WEIGHTS`) it is one rank of the
two-rank check: it prints that rank's `importance_weighted` result as JSON.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (as a script: the repository root)

from conftest import TINY, gradient_photos  # noqa: E402
from data_prep.prep import prep  # noqa: E402
from launch.cli import main  # noqa: E402
from model.vdvae import VDVAE  # noqa: E402
from pipeline.evaluate import importance_weighted  # noqa: E402
from pipeline.stream import ShardStream  # noqa: E402
from pipeline.weights import load_weights, save_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_VALID = 9  # on 2 ranks with batch 4: rank 0 reads 4 images and a masked padding row, rank 1 reads 5
DIMS = TINY.image_size ** 2 * 3
K_SAMPLES, CHUNK = 16, 8  # what the split checks use (chunk: two decoder passes per batch)
TRAIN_STEPS = 150


def _train_images(data: Path) -> torch.Tensor:
    batch = next(iter(ShardStream(str(data / "train"), 48, train=False)))
    return batch.images[batch.valid]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model after TRAIN_STEPS Adam steps on 48 gradient images, its weights file and the prepared split."""
    tmp = tmp_path_factory.mktemp("importance")
    prep("folder", gradient_photos(tmp / "src", count=72), str(tmp / "data"), samples_per_shard=16, resolution=8,
         num_valid=NUM_VALID, progress=False)
    images = _train_images(tmp / "data")
    torch.manual_seed(0)
    model = VDVAE(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: as fast on one thread, and no spinning threads on a busy machine
    try:
        for step in range(TRAIN_STEPS):
            torch.manual_seed(1000 + step)
            loss = model(images).elbo
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    weights = save_weights(model, tmp / "tiny.pt")
    return {"model": model, "data": str(tmp / "data"), "weights": str(weights), "images": images[:6],
            "final_elbo": loss.item()}


def _valid_stream(data: str, batch: int = 4, rank: int = 0, world: int = 1) -> ShardStream:
    return ShardStream(f"{data}/valid", batch, rank=rank, world=world, train=False)


# -- the log-densities of posterior draws -----------------------------------------------------------

def _elbo_pass(model, images, seed):
    """The ELBO's own pass from a seeded random state: per image (N,) -log p(x|z) and the analytic KL
    sum, nats (the ELBO's terms, which `forward` returns only as per-dimension means)."""
    with torch.no_grad():
        torch.manual_seed(seed)
        inp, target = model.preprocess(images)
        h, kls = model.decoder(model.encoder(inp))
        return model._neg_log_prob(h, target), kls.sum(0)


def test_log_densities_shapes_and_the_elbos_draw(trained):
    model, images = trained["model"], trained["images"]
    with torch.no_grad():
        torch.manual_seed(7)
        elbo = model(images)
        torch.manual_seed(7)
        terms = model.log_densities(images)
        torch.manual_seed(7)
        w = model.log_weights(images)
    for t in (terms.log_px_z, terms.log_pz, terms.log_qz):
        assert t.shape == (len(images), 1) and t.dtype == torch.float32
    assert w.shape == (len(images),) and torch.equal(w, terms.log_weight[:, 0])
    # from the same random state, the same z: log p(x|z) is the ELBO's distortion, per image in nats
    distortion, kl = _elbo_pass(model, images, seed=7)
    assert torch.allclose(elbo.per_image_elbo * DIMS, distortion + kl, rtol=1e-5)
    assert torch.allclose(-terms.log_px_z[:, 0], distortion, rtol=1e-5)


def test_log_px_z_uses_the_elbos_bit_depth(images):
    """ffhq256's 5-bit targets: log p(x|z) is the ELBO's 5-bit distortion, not an 8-bit one."""
    torch.manual_seed(0)
    model = VDVAE(dataclasses.replace(TINY, bits=5)).eval()
    torch.manual_seed(8)
    with torch.no_grad():
        log_px_z = model.log_densities(images).log_px_z[:, 0]
    distortion, _ = _elbo_pass(model, images, seed=8)
    assert torch.allclose(-log_px_z, distortion, rtol=1e-5)
    eight_bit = VDVAE(TINY).eval()
    eight_bit.load_state_dict(model.state_dict())
    torch.manual_seed(8)
    with torch.no_grad():
        assert not torch.allclose(eight_bit.log_densities(images).log_px_z[:, 0], log_px_z, rtol=1e-3)


def _draws(model, images, m, seed):
    """m draws per image from the global stream: (log densities (N, m), analytic KL sums (N, m),
    -ELBO in nats (N, m)), the same z in both passes."""
    with torch.no_grad():
        torch.manual_seed(seed)
        terms = model.log_densities(images, m)
    # rows i * m + j, as log_densities orders them
    distortion, kl = _elbo_pass(model, images.repeat_interleave(m, dim=0), seed)
    n = len(images)
    return terms, kl.view(n, m), (distortion + kl).view(n, m)


def _mean_se(x: torch.Tensor):
    x = x.double()
    return x.mean(1), x.std(1) / math.sqrt(x.shape[1])


def test_mean_log_weight_is_the_elbo(trained):
    """K=1: E[w] = -ELBO (nats per image). Independent draws for the two sides, within 4 standard errors."""
    model, images = trained["model"], trained["images"]
    m = 400
    terms, _, _ = _draws(model, images, m, seed=11)
    _, _, neg_elbo = _draws(model, images, m, seed=12)  # the ELBO of other draws
    w_mean, w_se = _mean_se(terms.log_weight)
    e_mean, e_se = _mean_se(-neg_elbo)
    diff, se = (w_mean - e_mean).abs(), (w_se ** 2 + e_se ** 2).sqrt()
    assert (diff <= 4 * se).all(), (diff, se)
    assert (se < 0.05 * w_mean.abs()).all()  # a test with teeth: the standard error is small


def test_sampled_log_densities_match_the_analytic_kl(trained):
    """E_q[log q(z|x) - log p(z)] = the analytic KL sum: on the same z (the KL of a lower group is
    conditional on the z above it), the difference averages to 0 within 4 standard errors."""
    model, images = trained["model"], trained["images"]
    m = 400
    terms, kl, neg_elbo = _draws(model, images, m, seed=21)
    sampled = terms.log_qz - terms.log_pz
    d_mean, d_se = _mean_se(sampled - kl)
    assert (d_mean.abs() <= 4 * d_se).all(), (d_mean, d_se)
    kl_mean, _ = _mean_se(kl)
    assert (kl_mean > 1.0).all()  # the trained model uses its latents
    assert (4 * d_se < 0.1 * kl_mean).all()  # and the check resolves a tenth of the KL
    # the same z: log p(x|z) + log p(z) - log q(z|x) and -ELBO differ by exactly that difference
    assert torch.allclose(terms.log_px_z - kl, -neg_elbo, rtol=1e-4, atol=1e-2)


def test_per_row_generators_make_a_draw_independent_of_its_batch(trained):
    model, images = trained["model"], trained["images"][:3]

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    with torch.no_grad():
        together = model.log_densities(images, 2, gens(range(6))).log_weight
        alone = torch.cat([model.log_densities(images[i:i + 1], 1, gens([2 * i + j])).log_weight
                           for i in range(3) for j in range(2)]).view(3, 2)
    assert torch.allclose(together, alone, rtol=1e-6)
    with pytest.raises(ValueError, match="one per row"):
        model.log_densities(images, 2, gens(range(5)))
    with pytest.raises(ValueError, match="draws=0"):
        model.log_densities(images, 0)


# -- the bound over a split --------------------------------------------------------------------------

def test_bound_tightens_with_k_and_is_deterministic(trained):
    model, data = trained["model"], trained["data"]
    cpu = torch.device("cpu")
    one = importance_weighted(model, _valid_stream(data), cpu, seed=3, k=1, chunk=1)
    many = importance_weighted(model, _valid_stream(data), cpu, seed=3, k=K_SAMPLES, chunk=CHUNK)
    again = importance_weighted(model, _valid_stream(data), cpu, seed=3, k=K_SAMPLES, chunk=CHUNK)
    other_chunk = importance_weighted(model, _valid_stream(data, batch=2), cpu, seed=3, k=K_SAMPLES, chunk=5)
    assert one.images == many.images == NUM_VALID and one.k == 1 and many.k == K_SAMPLES
    assert math.isfinite(many.nll) and many.stderr > 0
    assert many.nll <= one.nll + 0.5 * one.stderr, (one, many)
    assert many.bpd == pytest.approx(many.nll / math.log(2))
    assert many.stderr_bpd == pytest.approx(many.stderr / math.log(2))
    assert (again.nll, again.stderr) == (many.nll, many.stderr)  # same seed: the same draws
    # each image's draws are seeded by its key and draw: the batch and the chunk do not change them
    assert other_chunk.nll == pytest.approx(many.nll, rel=1e-6)
    assert other_chunk.stderr == pytest.approx(many.stderr, rel=1e-4)
    reseeded = importance_weighted(model, _valid_stream(data), cpu, seed=4, k=K_SAMPLES, chunk=CHUNK)
    assert reseeded.nll != many.nll
    with pytest.raises(ValueError, match="K=0"):
        importance_weighted(model, _valid_stream(data), cpu, seed=3, k=0)


def _rank_main(world: int, rank: int, port: int, data: str, weights: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, _ = load_weights(weights)
        model.eval()
        stream = _valid_stream(data, rank=rank, world=world)
        result = importance_weighted(model, stream, torch.device("cpu"), seed=3, k=K_SAMPLES, chunk=CHUNK)
        print(json.dumps(dataclasses.asdict(result)), flush=True)
    finally:
        dist.destroy_process_group()


def _run_ranks(world: int, port: int, data: str, weights: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, __file__, str(world), str(rank), str(port), data, weights],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_two_ranks_give_the_one_rank_result(trained, free_port):
    data = trained["data"]
    # the split really is uneven on 2 ranks: rank 0 pads with a masked row
    batches = [list(_valid_stream(data, rank=r, world=2)) for r in range(2)]
    assert [len(b) for b in batches] == [2, 2] and not batches[0][1].valid.any()
    # one process and two, each with one thread (the same kernels, so the same per-image values)
    (single,) = _run_ranks(1, free_port, data, trained["weights"])
    two = _run_ranks(2, free_port, data, trained["weights"])
    assert two[0] == {**two[1], "seconds": two[0]["seconds"]}  # every rank gets the totals
    assert two[0]["seconds"] > 0 and two[0]["images"] == single["images"] == NUM_VALID
    assert two[0]["unreadable"] == single["unreadable"] == 0
    for name in ("nll", "stderr"):  # exact but for the order of the sums
        assert two[0][name] == pytest.approx(single[name], rel=1e-12, abs=0), name
    # and this process (two threads: other kernels) differs by rounding only
    here = importance_weighted(trained["model"], _valid_stream(data), torch.device("cpu"), seed=3,
                               k=K_SAMPLES, chunk=CHUNK)
    assert here.nll == pytest.approx(single["nll"], rel=1e-6)


# -- the command ----------------------------------------------------------------------------------

def test_eval_command_prints_the_bound(trained, capsys):
    data, weights = trained["data"], trained["weights"]
    args = ["eval", weights, "--data", data, "--split", "valid", "--workers", "0", "--batch", "4", "--seed", "3"]
    def printed() -> list[str]:  # (not the warning DeepSpeed prints when it is imported)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("valid:")]

    assert main(args) == 0
    elbo_only = printed()
    assert len(elbo_only) == 1 and re.fullmatch(r"valid: \d+\.\d{4} bits/dim \(\d+\.\d{4} nats/dim\) on 9 images",
                                                elbo_only[0])
    assert main([*args, "--importance-samples", str(K_SAMPLES), "--importance-chunk", str(CHUNK)]) == 0
    lines = printed()
    assert len(lines) == 2 and lines[0] == elbo_only[0]  # the ELBO line as before
    expected = importance_weighted(trained["model"], _valid_stream(data), torch.device("cpu"), seed=3,
                                   k=K_SAMPLES, chunk=CHUNK)
    match = re.fullmatch(rf"valid: K={K_SAMPLES} importance-weighted NLL (\d+\.\d{{4}}) bits/dim "
                         r"\((\d+\.\d{4}) nats/dim\) ± (\d+\.\d{4}) \(standard error over 9 images\), "
                         r"(\S+) s per image", lines[1])
    assert match, lines
    assert match.group(1) == f"{expected.bpd:.4f}" and match.group(2) == f"{expected.nll:.4f}"
    assert match.group(3) == f"{expected.stderr_bpd:.4f}" and float(match.group(4)) > 0
    # the default chunk gives the same bound
    assert main([*args, "--importance-samples", str(K_SAMPLES)]) == 0
    assert printed()[1].split(", ")[0] == lines[1].split(", ")[0]


@pytest.mark.parametrize("value, why", [("0", "must be at least 1, got 0"), ("-3", "must be at least 1"),
                                        ("two", "expected a whole number")])
def test_eval_command_refuses_a_bad_k_before_loading_anything(tmp_path, capsys, value, why):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path / "no-such-weights.pt"), "--data", str(tmp_path / "no-such-data"),
              "--importance-samples", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--importance-samples" in err and why in err and "no-such" not in err


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
