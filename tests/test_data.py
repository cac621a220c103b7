import io

import numpy as np
import pytest
from PIL import Image

from sr.data import DEGRADATIONS, Degradation, ImageLoadError, PatchSampler, degrade, degrade_lr, load_image, modcrop


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgb_roundtrip(tmp_path, photo):
    path = _save(Image.fromarray(photo), tmp_path / "a.png")
    assert np.array_equal(load_image(path), photo)


def test_grayscale_becomes_rgb(tmp_path):
    path = _save(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)), tmp_path / "g.png")
    image = load_image(path)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2]) and image[0, 5, 1] == 5


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red under full transparency in the left half
    rgba[:, 2:, 3] = 255
    image = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    assert image[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not the hidden red
    assert image[0, 3].tolist() == [200, 0, 0]


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    assert load_image(_save(palette, tmp_path / "p.png", transparency=0))[0, 0].tolist() == [10, 20, 30]


def test_16_bit_is_scaled(tmp_path):
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    image = load_image(_save(deep, tmp_path / "d.png"))
    assert image.dtype == np.uint8 and image.max() == 255 and image.shape == (4, 4, 3)


def test_cmyk(tmp_path):
    image = load_image(_save(Image.new("CMYK", (5, 3), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert image.shape == (3, 5, 3) and image[1, 1, 0] > 200 and image[1, 1, 1] < 60


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(Image.fromarray(photo), tmp_path / "r.jpg", exif=exif, quality=95)
    assert load_image(path).shape == (90, 60, 3)


def test_corrupt_empty_and_missing(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name, pattern in [("bad.png", "not an image|corrupt"), ("empty.png", "empty"), ("text.jpg", "not an image")]:
        with pytest.raises(ImageLoadError, match=pattern):
            load_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no such image"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


def test_truncated_png(tmp_path, photo):
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    with pytest.raises(ImageLoadError, match="corrupt|truncated|not an image"):
        load_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_one_pixel_and_pixel_limit(tmp_path):
    assert load_image(_save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "one.png")).tolist() == [[[1, 2, 3]]]
    path = _save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="limit"):
        load_image(path, max_pixels=10_000)


def test_degrade_shapes_and_values(photo):
    hr, lr = degrade(photo, 4)
    assert hr.shape == (60, 88, 3) and lr.shape == (15, 22, 3)
    flat = np.full((30, 30, 3), 77, np.uint8)
    assert np.all(degrade(flat, 3)[1] == 77)  # bicubic keeps a constant image constant
    assert modcrop(photo, 7).shape == (56, 84, 3)
    with pytest.raises(ValueError, match="too small"):
        degrade(np.zeros((2, 2, 3), np.uint8), 3)


def test_patch_sampler_is_deterministic_and_skips_small(tmp_path, photo, caplog):
    _save(Image.fromarray(photo), tmp_path / "big.png")
    _save(Image.new("RGB", (10, 10)), tmp_path / "tiny.png")
    with caplog.at_level("INFO"):
        first = PatchSampler([tmp_path], scale=2, lr_patch=8, seed=3)
    assert "skipping tiny.png" in caplog.text and len(first.pairs) == 1
    lr, hr = first.batch(5)
    assert lr.shape == (5, 3, 8, 8) and hr.shape == (5, 3, 16, 16)
    assert 0.0 <= float(lr.min()) and float(hr.max()) <= 1.0
    again = PatchSampler([tmp_path], scale=2, lr_patch=8, seed=3).batch(5)
    assert np.array_equal(lr.numpy(), again[0].numpy())


def test_degradation_is_seeded_by_name_and_strengths_matter(photo):
    strong = DEGRADATIONS["strong"]
    _, clean = degrade(photo, 3)
    _, first = degrade(photo, 3, strong, "a.png")
    _, again = degrade(photo, 3, strong, "a.png")
    assert np.array_equal(first, again)  # the same image name and seed: the same LR, in every run
    assert not np.array_equal(first, degrade(photo, 3, strong, "b.png")[1])  # another image: other noise
    assert not np.array_equal(first, degrade(photo, 3, Degradation(1.0, 8.0, 40, seed=1), "a.png")[1])
    assert np.array_equal(degrade(photo, 3, Degradation(), "a.png")[1], clean)  # clean = the benchmarks' bicubic
    errors = {}
    for name, degradation in {"blur": Degradation(blur=1.0), "more blur": Degradation(blur=2.0),
                              "noise": Degradation(noise=5.0), "more noise": Degradation(noise=20.0),
                              "jpeg 90": Degradation(jpeg=90), "jpeg 10": Degradation(jpeg=10)}.items():
        errors[name] = float(np.abs(degrade_lr(clean, degradation).astype(float) - clean).mean())
    assert 0 < errors["blur"] < errors["more blur"] and 0 < errors["noise"] < errors["more noise"]
    assert 0 < errors["jpeg 90"] < errors["jpeg 10"]
    flat = np.full((30, 30, 3), 77, np.uint8)
    assert np.all(degrade_lr(flat, Degradation(blur=2.0)) == 77)  # blur alone keeps a constant image constant


def test_degradation_specs_and_errors():
    assert Degradation.parse("strong") is DEGRADATIONS["strong"] and Degradation.parse(None).is_clean
    custom = Degradation.parse("blur=0.5, noise=3,jpeg=70")
    assert custom == Degradation(blur=0.5, noise=3.0, jpeg=70) and custom.spec() == "blur=0.5,noise=3,jpeg=70,seed=0"
    assert Degradation.parse(custom.spec()) == custom and Degradation.parse("blur=1,noise=8,jpeg=40").spec() == "strong"
    with pytest.raises(ValueError, match=r"unknown degradation 'heavy'; choose a preset \(clean, strong\)"):
        Degradation.parse("heavy")
    with pytest.raises(ValueError, match="jpeg quality must be 1..100"):
        Degradation.parse("jpeg=0")
    with pytest.raises(ValueError, match="noise=abc"):
        Degradation.parse("noise=abc")
    with pytest.raises(ValueError, match="blur and noise must be >= 0"):
        Degradation(blur=-1.0)


def test_degraded_sampler_draws_the_same_patches(tmp_path, photo):
    _save(Image.fromarray(photo), tmp_path / "big.png")
    plain = PatchSampler([tmp_path], scale=2, lr_patch=8, seed=3).batch(5)
    lr, hr, clean = PatchSampler([tmp_path], scale=2, lr_patch=8, seed=3,
                                 degradation=DEGRADATIONS["strong"]).batch(5, with_clean=True)
    assert np.array_equal(hr.numpy(), plain[1].numpy()) and np.array_equal(clean.numpy(), plain[0].numpy())
    assert not np.array_equal(lr.numpy(), clean.numpy())


def test_the_calibration_images_memo_never_races_its_evictions(tmp_path):
    """Several threads reading more folders than the memo keeps (so each read evicts another's entry) always get
    their own images: a lookup used to race another thread's clear() (KeyError)."""
    import threading

    from PIL import Image

    from sr.quant.calibdata import load_calibration_images

    folders = []
    for index in range(12):
        folder = tmp_path / f"set{index}"
        folder.mkdir()
        for name in range(20):  # several images a folder: the memo's bookkeeping takes a while
            Image.fromarray(np.full((4, 4, 3), index * 20, np.uint8)).save(folder / f"{name:02d}.png")
        folders.append(folder)
    errors = []

    def read(offset: int):
        try:
            for step in range(100):
                index = (offset + step) % len(folders)
                assert int(load_calibration_images(str(folders[index]))[0][0, 0, 0]) == index * 20
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(repr(error))

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: races show at once
    try:
        threads = [threading.Thread(target=read, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
