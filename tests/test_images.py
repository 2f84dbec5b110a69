import io

import numpy as np
import pytest
from PIL import Image

from agiqa.data.images import decode_image, list_images, load_image, resolve_key
from agiqa.errors import BadImageError, DatasetError


def test_folder_listing_separates_non_images(photo_folder):
    root, kinds = photo_folder
    images, others = list_images(root)
    assert others == ["notes.txt"]
    assert set(images) == {k for k, v in kinds.items() if v != "skipped"}
    assert all("\\" not in k and not k.startswith("/") for k in images)


@pytest.mark.parametrize("key", [
    "nested/camera_gray.png", "nested/chelsea_palette.gif", "nested/coffee_rgba.png",
    "nested/deeper/rocket_cmyk.jpg", "nested/deeper/camera_16bit.png", "coffee.webp",
])
def test_modes_become_rgb(photo_folder, key):
    root, _ = photo_folder
    img, sha = load_image(root / key)
    assert img.mode == "RGB"
    assert len(sha) == 64
    arr = np.asarray(img)
    assert arr.std() > 5  # real content survived the conversion


def test_sixteen_bit_is_scaled_not_clipped(photo_folder):
    root, _ = photo_folder
    gray16, _ = load_image(root / "nested/deeper/camera_16bit.png")
    gray8, _ = load_image(root / "nested/camera_gray.png")
    diff = np.abs(np.asarray(gray16, int) - np.asarray(gray8, int))
    assert diff.max() <= 1


def test_exif_orientation_is_applied(photo_folder):
    root, _ = photo_folder
    img, _ = load_image(root / "nested/deeper/chelsea_exif.jpg")
    assert img.size == (80, 120)  # stored 120×80, displayed rotated


@pytest.mark.parametrize("key,reason", [
    ("zero_bytes.png", "empty file (0 bytes)"),
    ("truncated.jpg", "truncated"),
    ("text_as.jpg", "not an image"),
])
def test_broken_files_name_the_file_and_reason(photo_folder, key, reason):
    root, _ = photo_folder
    with pytest.raises(BadImageError) as err:
        load_image(root / key, key)
    assert str(err.value).startswith(f"{key}: ")
    assert reason in err.value.reason


def test_missing_file():
    with pytest.raises(BadImageError, match="file not found"):
        load_image("/nonexistent/x.png", "x.png")


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, "PNG")
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(buf.getvalue(), "bomb.png")


@pytest.mark.parametrize("key", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd"])
def test_keys_escaping_the_root_are_refused(tmp_path, key):
    with pytest.raises(DatasetError, match="escapes the image root|absolute"):
        resolve_key(tmp_path, key)


# -- keys: one spelling per image; only regular files are read --------------------------------
def test_path_aliases_are_one_key(tmp_path):
    from agiqa.data.datasets import load_dataset
    from agiqa.data.images import normalize_key

    assert normalize_key("./a.jpg") == normalize_key("b/../a.jpg") == "a.jpg"
    assert normalize_key("sub\\x.png") == "sub/x.png"
    (tmp_path / "b").mkdir()
    (tmp_path / "labels.csv").write_text("image,mos\na.jpg,1\n./a.jpg,2\n")
    with pytest.raises(DatasetError,
                       match=r"line 3: image 'a.jpg' is listed twice \(as './a.jpg'\)"):
        load_dataset("csv", tmp_path, tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("image,mos\nb/../a.jpg,1\n")
    assert load_dataset("csv", tmp_path, tmp_path / "labels.csv").keys == ["a.jpg"]


def test_ragged_csv_row_and_nul_byte_are_one_error(tmp_path):
    from agiqa.data.datasets import load_dataset

    (tmp_path / "labels.csv").write_text("image,mos\na.jpg,1\nb.jpg,2,extra\n")
    with pytest.raises(DatasetError, match="labels.csv, line 3: 3 fields, the header names 2"):
        load_dataset("csv", tmp_path, tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("image,mos\na\0b.jpg,1\n")
    with pytest.raises(DatasetError, match="line 2: image path .* contains a NUL byte"):
        load_dataset("csv", tmp_path, tmp_path / "labels.csv")


class _deadline:
    """Raise TimeoutError in the test after ``seconds``: a blocking open must fail the test,
    not hang the suite."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def expire(signum, frame):
            raise TimeoutError(f"still blocked after {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def test_fifo_is_refused_without_opening_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    with _deadline(10):
        with pytest.raises(BadImageError, match="pipe.jpg: a FIFO \\(named pipe\\), not a regular"):
            load_image(tmp_path / "pipe.jpg", "pipe.jpg")
    assert list_images(tmp_path)[0] == ["pipe.jpg"]  # listed, so the run reports it


def test_symlinks_followed_to_regular_files_else_named(tmp_path):
    import os

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(outside / "real.png")
    root = tmp_path / "imgs"
    root.mkdir()
    os.symlink(outside / "real.png", root / "link.png")
    os.symlink(outside / "gone.png", root / "dangling.png")
    os.symlink(root / "loop.png", root / "loop.png")
    img, _ = load_image(resolve_key(root, "link.png"), "link.png")
    assert img.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(BadImageError, match="dangling.png: broken symbolic link"):
        load_image(resolve_key(root, "dangling.png"), "dangling.png")
    with pytest.raises(BadImageError, match="loop.png: cannot read"):
        load_image(resolve_key(root, "loop.png"), "loop.png")
    assert list_images(root)[0] == ["dangling.png", "link.png", "loop.png"]


@pytest.mark.slow
@pytest.mark.parametrize("loader_workers", [0, 1])
def test_extraction_records_bad_links_and_fifos_and_goes_on(tiny_llava, tmp_path,
                                                            loader_workers):
    import os

    from agiqa.cache import open_cache
    from agiqa.stages.extraction.extract import ExtractConfig, ImageSource, extract_semantics

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(outside / "real.png")
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (16, 16), (0, 90, 0)).save(root / "plain.png")
    os.symlink(outside / "real.png", root / "out_link.png")
    os.symlink(outside / "gone.png", root / "dangling.png")
    os.mkfifo(root / "pipe.png")
    cfg = ExtractConfig(out=tmp_path / "c", mllm=str(tiny_llava), progress=False,
                        loader_workers=loader_workers)
    with _deadline(120):
        report = extract_semantics(cfg, ImageSource.from_folder(root))
    assert sorted(report.failures) == ["dangling.png", "pipe.png"]
    assert "FIFO" in report.failures["pipe.png"]
    assert "broken symbolic link" in report.failures["dangling.png"]
    assert open_cache(tmp_path / "c").keys == ["out_link.png", "plain.png"]


# -- pixels: as OpenCV's imread(IMREAD_COLOR), the official decoder, reads them ---------------
def _opencv_rgb(path):
    cv2 = pytest.importorskip("cv2")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else bgr[..., ::-1]


@pytest.mark.parametrize("name, make", [
    ("dark_gray16.png", lambda r: r.integers(0, 256, (12, 10), dtype=np.uint16)),
    ("gray16.png", lambda r: r.integers(0, 65536, (12, 10), dtype=np.uint16)),
    ("rgb16.png", lambda r: r.integers(0, 65536, (12, 10, 3), dtype=np.uint16)),
    ("dark_gray16.tiff", lambda r: r.integers(0, 300, (12, 10), dtype=np.uint16)),
    ("gray16.tiff", lambda r: r.integers(0, 65536, (12, 10), dtype=np.uint16)),
])
def test_sixteen_bit_images_decode_as_opencv(tmp_path, name, make):
    cv2 = pytest.importorskip("cv2")
    arr = make(np.random.default_rng(len(name)))
    cv2.imwrite(str(tmp_path / name), arr)
    img, _ = load_image(tmp_path / name)
    np.testing.assert_array_equal(np.asarray(img), _opencv_rgb(tmp_path / name))
    if name.startswith("dark"):
        assert np.asarray(img).max() <= 1  # high byte of a dark image: black, as OpenCV has it


def test_sixteen_bit_rgb_tiff_within_one_level_of_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2")
    arr = np.random.default_rng(3).integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.tiff"), arr)
    img, _ = load_image(tmp_path / "rgb16.tiff")
    diff = np.asarray(img).astype(int) - _opencv_rgb(tmp_path / "rgb16.tiff").astype(int)
    assert np.abs(diff).max() <= 1  # libtiff rounds (v / 257); Pillow keeps v >> 8


def test_float_tiff_is_refused_as_opencv_cannot_read_it(tmp_path):
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "f.tiff"), np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10))
    assert _opencv_rgb(tmp_path / "f.tiff") is None
    with pytest.raises(BadImageError, match="f.tiff: floating-point samples"):
        load_image(tmp_path / "f.tiff", "f.tiff")
