"""Official checkpoint layout: round trip, CLI import, and a clear error for each mismatch."""

import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from model import VDVAE, CheckpointMismatchError, get_preset, load_official, official_state_dict
from model.official import check_official_state_dict, to_official_names
from launch.cli import main as cli_main
from pipeline.weights import load_weights, save_weights


def meta_state_dict(name):
    with torch.device("meta"):
        return to_official_names(VDVAE(get_preset(name).model).state_dict())


def perturbed(config, seed=0):
    torch.manual_seed(seed)
    model = VDVAE(config)
    with torch.no_grad():  # leave the zero-initialised layers non-zero, as a trained model has them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_official_round_trip_gives_equal_outputs(tiny_config, images, tmp_path):
    ours = perturbed(tiny_config)
    path = tmp_path / "tiny-model-ema.th"
    torch.save(official_state_dict(ours), path)
    loaded = load_official(path, tiny_config)
    for model in (ours, loaded):
        torch.manual_seed(3)
        model.out = model(images)
    assert torch.equal(ours.out.per_image_elbo, loaded.out.per_image_elbo)
    a = ours.sample(2, 0.7, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(2, 0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_official_keys_are_the_released_names():
    keys = set(meta_state_dict("ffhq256"))
    for key in ("encoder.in_conv.weight", "encoder.enc_blocks.0.c1.weight",
                "decoder.dec_blocks.0.enc.c1.weight", "decoder.dec_blocks.0.prior.c4.weight",
                "decoder.dec_blocks.0.z_proj.weight", "decoder.bias_xs.0",
                "decoder.out_net.out_conv.weight", "decoder.gain", "decoder.bias"):
        assert key in keys


def test_ddp_module_prefix_is_accepted(tiny_config, images):
    ours = perturbed(tiny_config)
    wrapped = OrderedDict(("module." + k, v) for k, v in official_state_dict(ours).items())
    loaded = load_official(wrapped, tiny_config)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_missing_keys_are_listed():
    sd = meta_state_dict("cifar10")
    del sd["decoder.gain"]
    del sd["encoder.enc_blocks.3.c2.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"2 missing keys: encoder.enc_blocks.3.c2.bias, decoder.gain"):
        check_official_state_dict(sd, "cifar10")


def test_unexpected_keys_are_listed():
    sd = meta_state_dict("cifar10")
    sd["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected keys: decoder.extra.weight"):
        check_official_state_dict(sd, "cifar10")


def test_wrong_shapes_are_listed():
    sd = meta_state_dict("cifar10")
    sd["decoder.gain"] = torch.zeros(1, 512, 1, 1)
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 wrong shapes: decoder.gain: file \(1, 512, 1, 1\) vs model \(1, 384, 1, 1\)"):
        check_official_state_dict(sd, "cifar10")


def test_wrong_preset_names_the_right_one():
    with pytest.raises(CheckpointMismatchError, match=r"does not fit imagenet32.*matches preset 'cifar10'"):
        check_official_state_dict(meta_state_dict("cifar10"), "imagenet32")


def test_ffhq1024_with_one_encoder_block_fewer_is_explained():
    """openai/vdvae#3: the released state dict lacks encoder.enc_blocks.68.* that the hps build."""
    sd = meta_state_dict("ffhq1024")
    for key in [k for k in sd if k.startswith("encoder.enc_blocks.68.")]:
        del sd[key]
    with pytest.raises(CheckpointMismatchError, match=r"8 missing keys: encoder.enc_blocks.68.c1.weight"):
        check_official_state_dict(sd, "ffhq1024")


def test_not_a_state_dict():
    with pytest.raises(CheckpointMismatchError, match="expected a state dict"):
        check_official_state_dict([1, 2], "cifar10")


def test_our_weights_file_round_trip(tiny_config, images, tmp_path):
    ours = perturbed(tiny_config)
    save_weights(ours, tmp_path / "w.pt", preset=None)
    loaded, preset = load_weights(tmp_path / "w.pt")
    assert preset is None and loaded.config == tiny_config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="import-official"):
        load_weights(tmp_path / "other.pt")


def test_import_official_command(tmp_path, capsys):
    torch.manual_seed(0)
    model = VDVAE(get_preset("cifar10").model)
    src = tmp_path / "cifar10-seed0-model-ema.th"
    torch.save(official_state_dict(model), src)
    out = tmp_path / "ours.pt"
    assert cli_main(["import-official", str(src), "--preset", "cifar10", "--out", str(out)]) == 0
    assert "39,145,700 parameters" in capsys.readouterr().out
    loaded, preset = load_weights(out)
    assert preset == "cifar10"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    # existing output is refused; a wrong preset fails with the differences, writing nothing
    with pytest.raises(SystemExit, match="--overwrite"):
        cli_main(["import-official", str(src), "--preset", "cifar10", "--out", str(out)])
    assert cli_main(["import-official", str(src), "--preset", "imagenet32",
                     "--out", str(tmp_path / "x.pt")]) == 2
    assert "matches preset 'cifar10'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert cli_main(["import-official", str(tmp_path / "nope.th"), "--preset", "cifar10",
                     "--out", str(tmp_path / "y.pt")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("presets", "import-official", "demo"):
        assert command in out.stdout
