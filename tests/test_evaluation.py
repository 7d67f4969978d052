"""`fastdiff fid` / `fastdiff sample` sources and bad input: a message and exit code 2, nothing overwritten."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.errors import InputError
from fastdiff.eval.sources import load_source, source_features
from fastdiff.eval.extractors import load_extractor


def _folder(path, n, size=(8, 8), mode="L"):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, size, 10 * i).save(path / f"{i}.png")
    return path


def test_sources_folder_npz_dataset_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    folder = load_source(str(_folder(tmp_path / "imgs", 3)), channels=1)
    assert folder.images.shape == (3, 1, 8, 8)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "arr.npz", arr_0=pixels)
    arr = load_source(str(tmp_path / "arr.npz"), channels=1)
    torch.testing.assert_close(arr.images[:, 0], torch.from_numpy(pixels[..., 0] / 127.5 - 1).float())
    ext = load_extractor("digits")
    data = load_source("digits:test", 1)
    first = source_features(data, ext)
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1
    again = source_features(data, ext)  # from the cache, identical
    torch.testing.assert_close(first.mu, again.mu)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _folder(p / "one", 1), "at least 2 images; found 1"),
        (lambda p: (_folder(p / "mixed", 2), Image.new("L", (9, 9)).save(p / "mixed" / "x.png"))[0], "images differ in size"),
        (lambda p: (_folder(p / "bad", 2), (p / "bad" / "z.png").write_bytes(b"junk"))[0], "cannot read image .*z.png"),
        (lambda p: (np.savez(p / "s.npz", mean=np.zeros(3)), p / "s.npz")[1], r"neither statistics \(mu, sigma\) nor images"),
        (lambda p: p / "missing-folder", "not a folder, an .npz file or a data set split"),
    ],
)
def test_bad_sources(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        load_source(str(make(tmp_path)), channels=1)


def test_channel_mismatch(tmp_path):
    np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="3 channels, the digits extractor takes 1"):
        source_features(load_source(str(tmp_path / "rgb.npz"), 1), load_extractor("digits"), use_cache=False)


def test_fid_cli_end_to_end_with_stats(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    args = ["fid", "digits:train", "digits:test", "--extractor", "digits", "--no-progress"]
    assert main([*args, "--kid", "--pr", "--json", str(tmp_path / "r.json"), "--save-stats", str(tmp_path / "s.npz")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["extractor"] == "digits" and len(record["weights_sha256"]) == 64
    assert {"fid", "kid_mean", "kid_std", "precision", "recall"} <= set(record["metrics"])
    assert record["num_generated"] == 1437 and record["num_reference"] == 360
    # the train split's saved statistics as the reference of a test-vs-train run give the same FID
    assert main(["fid", "digits:test", str(tmp_path / "s.npz"), "--extractor", "digits", "--json", str(tmp_path / "t.json")]) == 0
    again = json.loads((tmp_path / "t.json").read_text())["metrics"]["fid"]
    assert again == pytest.approx(record["metrics"]["fid"], rel=1e-6)


def test_cli_bad_input_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))
    assert main(["fid", "digits:train", "digits:test"]) == 2
    assert "--inception-weights" in capsys.readouterr().err
    assert main(["fid", "--pipeline", str(tmp_path), "digits:test", "--extractor", "digits"]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert main(["fid", "digits:test", "--extractor", "digits"]) == 2
    assert "give two sources" in capsys.readouterr().err
    np.savez(tmp_path / "s.npz", mu=np.zeros(128))
    assert main(["fid", "digits:test", str(tmp_path / "s.npz"), "--extractor", "digits"]) == 2
    assert "neither statistics" in capsys.readouterr().err
    assert main(["sample", "--pipeline", "assets/teachers/digits", "--classes", "a,b", "--out", str(tmp_path / "new")]) == 2
    assert "--classes must be comma-separated integers" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "grid.png").write_bytes(b"precious")
    assert main(["sample", "--pipeline", "assets/teachers/digits", "--out", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "grid.png").read_bytes() == b"precious"
