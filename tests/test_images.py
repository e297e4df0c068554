"""``fcn_jax.images.read_image``, the one image reader: pycaffe-equal on ordinary images,
first frame only, pixel budget from the header, regular files only, one error type."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_jax.images import MAX_PIXELS, ImageError, image_size, read_image

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "tests" / "data" / "source" / "cat.jpg"


def bomb_gif(width: int = 8000, height: int = 8000, frames: int = 3) -> bytes:
    """An animated GIF whose every frame is the whole ``width x height`` screen (Pillow
    decodes each frame at screen size) from a 1x1 image block: 89 bytes for 3 frames."""
    out = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control block: delay 1
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return out + b"\x3b"


def test_the_bomb_gif_is_89_bytes_of_three_8000x8000_frames():
    raw = bomb_gif()
    assert len(raw) == 89
    with Image.open(io.BytesIO(raw)) as im:
        assert im.size == (8000, 8000) and im.n_frames == 3


def test_single_frame_images_equal_skimage(tmp_path):
    """What pycaffe's load_image reads (skimage.io.imread -> img_as_float -> float32)."""
    import skimage
    import skimage.io

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (9, 7, 3), np.uint8)).convert("P").save(
        tmp_path / "p.png")
    Image.fromarray(rng.integers(0, 65535, (9, 7), np.uint16)).save(tmp_path / "g16.png")
    for f in (CAT, tmp_path / "p.png", tmp_path / "g16.png"):
        want = skimage.img_as_float(skimage.io.imread(f)).astype(np.float32)
        got = read_image(f)
        want = np.repeat(want[..., None], 3, axis=2) if want.ndim == 2 else want[..., :3]
        np.testing.assert_array_equal(got, want)
        gray = skimage.img_as_float(skimage.io.imread(f, as_gray=True)).astype(np.float32)
        np.testing.assert_array_equal(read_image(f, color=False)[..., 0], gray)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_multi_frame_files_give_their_first_frame(tmp_path, fmt):
    frames = [Image.fromarray(np.full((6, 5, 3), v, np.uint8)) for v in (10, 200, 90)]
    f = tmp_path / f"anim.{fmt.lower()}"
    kw = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(f, format=fmt, save_all=True, append_images=frames[1:], **kw)
    out = read_image(f)
    assert out.shape == (6, 5, 3)
    np.testing.assert_allclose(out, 10 / 255, atol=1 / 255)


def test_an_89_byte_gif_of_three_huge_frames_decodes_one_frame_at_most(tmp_path):
    """Refused from its header under a smaller pixel budget; under the default (64 Mpx, the
    frame is exactly that) only frame 0 is decoded, within a 4 GB address space, in
    seconds (imageio decoded all three: 5.3 GB)."""
    path = tmp_path / "bomb.gif"
    path.write_bytes(bomb_gif())
    t = time.perf_counter()
    with pytest.raises(ImageError, match=r"8000x8000 image has more than 1000000 pixels"):
        read_image(path, max_pixels=1_000_000)
    assert time.perf_counter() - t < 1.0
    code = textwrap.dedent(f"""
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from fcn_jax.images import read_image
        t = time.perf_counter()
        x = read_image(sys.argv[1])
        print(x.shape, x.dtype, round(time.perf_counter() - t, 1))
        assert x.shape == (8000, 8000, 3) and {MAX_PIXELS} == 8000 * 8000
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(8000, 8000, 3) float32" in r.stdout


def test_a_huge_png_header_is_refused_before_decoding(tmp_path):
    """A PNG header claiming 100000 x 100000 (Pillow's own bomb check would raise its
    DecompressionBombError): one ImageError, nothing decoded."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000,
                                                               8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    f = tmp_path / "big.png"
    f.write_bytes(raw)
    with pytest.raises(ImageError, match=r"big\.png: too many pixels|more than"):
        read_image(f)


def test_non_images_give_one_clear_error(tmp_path):
    (tmp_path / "text.png").write_text("this is text, not a PNG\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:60])
    for name, reason in [("text.png", "not an image file"), ("empty.jpg", "not an image file"),
                         ("cut.png", "cannot decode|corrupt")]:
        with pytest.raises(ImageError) as e:
            read_image(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name) + ": ") and "\n" not in msg
        assert "imageio" not in msg and "pip install" not in msg
        assert any(r in msg for r in reason.split("|")), msg


def test_a_fifo_is_refused_at_once_never_read(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            read_image(fifo)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            outcome.append(e)

    th = threading.Thread(target=attempt, daemon=True)
    th.start()
    th.join(5)
    if th.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome[0], ImageError)
    assert "not a regular file (a FIFO)" in str(outcome[0])
    with pytest.raises(ImageError, match="a folder"):
        read_image(tmp_path)


def test_image_size_reads_only_the_header(tmp_path):
    assert image_size(CAT) == (360, 480)
    path = tmp_path / "big.gif"
    path.write_bytes(bomb_gif(12000, 10000))
    assert image_size(path) == (10000, 12000)  # over the pixel budget: never decoded
    path.write_bytes(bomb_gif(30000, 20000))  # over Pillow's own limit too: our message
    with pytest.raises(ImageError, match=r"image of 600000000 pixels has more than "):
        image_size(path)


def test_the_pixel_budget_counts_the_float32_result(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_JAX_MEMORY_BUDGET", "1000")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="20x20 image needs 6400 bytes as float32, over "
                                         "the memory budget of 1000"):
        read_image(tmp_path / "a.png")
