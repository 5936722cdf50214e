"""po_batch.prep.image against transformers' own Qwen image processor: same bytes in, bit-identical
pixel_values and image_grid_thw out; and every bad image is a row error of the right kind."""

import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from po_batch.prep.image import ImageError, ImageSpec, decode, prepare, read_path, smart_resize, \
    spec_from_preprocessor_config

CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"  # copies of shared/checkpoint-configs


def published(name: str) -> dict:
    return json.loads((CONFIGS / name / "preprocessor_config.json").read_text())


# The published files, with small pixel limits so that the test is fast and every resize branch is taken.
QWEN2 = {**published("Qwen2-VL-2B-Instruct"), "min_pixels": 112 * 112, "max_pixels": 320 * 320}
QWEN3 = {**published("Qwen3-VL-2B-Instruct"), "size": {"shortest_edge": 112 * 112, "longest_edge": 320 * 320}}


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 RGB: smooth gradients plus noise, so that resizing has something to get wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + 1) + y, np.cos(5 * y) * x, np.sin(4 * (x + y))], -1) * 80 + 128
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(im: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    im = Image.fromarray(im) if isinstance(im, np.ndarray) else im
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(w: int, h: int, depth: int, color: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what PIL will not write (16-bit RGB) or should not (lying headers)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' processor for each config, loaded as a checkpoint's would be: the json in a directory."""
    from transformers import AutoImageProcessor

    procs = {}
    for name, cfg in (("qwen2", QWEN2), ("qwen3", QWEN3)):
        d = tmp_path_factory.mktemp(name)
        (d / "preprocessor_config.json").write_text(json.dumps(cfg))
        procs[name] = AutoImageProcessor.from_pretrained(d)
    return procs


def hf_reference(proc, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers on the same bytes: PIL decode, EXIF orientation (as transformers.image_utils.load_image
    applies it), then the processor, which converts to RGB itself."""
    out = proc(images=[ImageOps.exif_transpose(Image.open(io.BytesIO(data)))], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def hf_order_patches(pixels: np.ndarray, spec: ImageSpec, fused: bool = True) -> torch.Tensor:
    """What the engine does on the GPU, as transformers does it: uint8 (H, W, 3) -> normalised float32
    (grid_t*grid_h*grid_w, C*T*p*p), rows in merge-block order, each row channel-major, a still image repeated
    along T. transformers fuses rescale and normalise as (x - 255*mean) / (255*std) in float32, which this
    matches bit for bit; fused=False computes (x/255 - mean) / std, which differs in the last bits."""
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()
    mean, std = torch.tensor(spec.image_mean)[:, None, None], torch.tensor(spec.image_std)[:, None, None]
    x = (x - mean * 255.0) / (std * 255.0) if fused else (x / 255 - mean) / std
    c, h, w = x.shape
    gh, gw = h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, c, p, p)
    return x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1).reshape(gh * gw, c * t * p * p)


def assert_parity(proc, data: bytes, spec: ImageSpec) -> np.ndarray:
    pixels, grid = prepare(data, spec)
    assert pixels.dtype == np.uint8 and pixels.flags.c_contiguous and pixels.shape[2] == 3
    ref_values, ref_grid = hf_reference(proc, data)
    assert grid == tuple(ref_grid[0].tolist())
    assert torch.equal(hf_order_patches(pixels, spec), ref_values)  # bit-identical, no tolerance
    return pixels


@pytest.mark.parametrize("name,cfg", [("qwen2", QWEN2), ("qwen3", QWEN3)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("h,w", [(40, 50),     # enlarged to min_pixels
                                 (600, 800),   # shrunk to max_pixels
                                 (90, 1000),   # very wide
                                 (500, 300),   # portrait, shrunk
                                 (224, 224),   # already on the grid: no resize at all
                                 (3, 3)])      # tiny: transformers 5 enlarges it, so do we
def test_prepare_equals_transformers_processor(hf, name, cfg, fmt, h, w):
    spec = spec_from_preprocessor_config(cfg)
    data = encode(photo(h, w, seed=h * w), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    pixels = assert_parity(hf[name], data, spec)
    assert pixels.shape[:2] == smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)


def test_unfused_normalisation_is_within_1e_6_of_transformers(hf):
    spec = spec_from_preprocessor_config(QWEN2)
    data = encode(photo(300, 200), "PNG")
    ref, _ = hf_reference(hf["qwen2"], data)
    naive = hf_order_patches(prepare(data, spec)[0], spec, fused=False)
    assert (naive - ref).abs().max() <= 1e-6


def test_resize_equals_torchvision_bicubic_antialias_at_any_scale():
    """The resize alone against the call transformers makes (tvF.resize on the uint8 CHW tensor), over random
    scales from 10x up to 20x down, on noise and on 0/255 patterns that push the integer sums to their bounds."""
    from torchvision.transforms.v2 import functional as tvF

    from po_batch.prep.image import _axis_plan, resize

    rng = np.random.default_rng(0)
    sizes = [((h, w), (int(rng.integers(1, 2 * h + 2)), int(rng.integers(1, 2 * w + 2))))
             for h, w in rng.integers(1, 200, (60, 2))]
    sizes += [((40, 1500), (40, 75)), ((1500, 40), (70, 40)),  # 20x down: float64 sums
              ((100, 1280), (100, 512)), ((30, 50), (300, 480)), ((5, 5), (28, 28))]
    dtypes = set()
    for i, ((h, w), (nh, nw)) in enumerate(sizes):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if i % 2 else \
            (rng.integers(0, 2, (h, w, 3)) * 255).astype(np.uint8)
        want = tvF.resize(torch.from_numpy(a).permute(2, 0, 1).contiguous(), [nh, nw],
                          interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        assert np.array_equal(resize(Image.fromarray(a), nh, nw), want.permute(1, 2, 0).numpy()), (h, w, nh, nw)
        dtypes |= {(_axis_plan(n, m)[0], _axis_plan(n, m)[1][0][6] is None) for n, m in ((w, nw), (h, nh)) if n != m}
    assert dtypes == {(np.float32, True), (np.float32, False), (np.float64, True)}  # every rounding path ran


def test_processor_is_transformers_default_torchvision_qwen2vl(hf):
    for proc in hf.values():
        assert type(proc).__name__ == "Qwen2VLImageProcessor" and proc.backend == "torchvision"
        assert proc.resample == 3  # PIL BICUBIC -> torchvision BICUBIC, antialias=True


# --- modes, orientation, formats ------------------------------------------------------------------------------

def test_exif_orientation_6_is_applied(hf):
    arr = photo(120, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    data = encode(arr, "JPEG", quality=95, exif=exif.tobytes())
    im = decode(data)
    assert im.size == (120, 200)  # (width, height): upright is portrait
    stored = np.array(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.array(im), np.rot90(stored, k=-1))
    assert_parity(hf["qwen3"], data, spec_from_preprocessor_config(QWEN3))


def test_palette_png_with_and_without_transparency(hf):
    spec = spec_from_preprocessor_config(QWEN2)
    pal = Image.fromarray(photo(150, 180)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    assert_parity(hf["qwen2"], encode(pal, "PNG"), spec)
    transparent = encode(pal, "PNG", transparency=int(np.array(pal)[0, 0]))
    assert decode(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert_parity(hf["qwen2"], transparent, spec)


def test_rgba_png_is_composited_onto_white(hf):
    arr = photo(140, 160)
    alpha = np.tile(np.linspace(0, 255, 160).astype(np.uint8), (140, 1))
    data = encode(np.dstack([arr, alpha]), "PNG")
    im = np.array(decode(data)).astype(int)
    assert (im[:, 0] == 255).all()                    # alpha 0: white
    assert np.abs(im[:, -1] - arr[:, -1]).max() <= 1  # alpha 255: the colour itself
    assert_parity(hf["qwen3"], data, spec_from_preprocessor_config(QWEN3))
    la = encode(Image.fromarray(np.dstack([arr[..., 0], alpha]), "LA"), "PNG")
    assert_parity(hf["qwen3"], la, spec_from_preprocessor_config(QWEN3))


def test_cmyk_jpeg(hf):
    data = encode(Image.fromarray(photo(130, 170)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert decode(data).mode == "RGB"
    assert_parity(hf["qwen2"], data, spec_from_preprocessor_config(QWEN2))


def test_16_bit_png_grey_is_clipped_like_transformers_and_rgb_keeps_the_high_byte(hf):
    rng = np.random.default_rng(3)
    grey16 = rng.integers(0, 300, (100, 120)).astype(np.uint16)  # mostly below 256, some above
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # PIL's convert("RGB"), which transformers uses, clips 16-bit values to 255 (it does not scale them)
    assert np.array_equal(np.array(decode(data))[..., 0], np.minimum(grey16, 255).astype(np.uint8))
    assert_parity(hf["qwen2"], data, spec_from_preprocessor_config(QWEN2))

    rgb16 = rng.integers(0, 65536, (60, 80, 3)).astype(">u2")
    data = png_bytes(80, 60, 16, 2, b"".join(b"\x00" + row.tobytes() for row in rgb16))
    assert np.array_equal(np.array(decode(data)), (rgb16 >> 8).astype(np.uint8))
    assert_parity(hf["qwen2"], data, spec_from_preprocessor_config(QWEN2))


@pytest.mark.parametrize("mode", ["L", "1", "I"])
def test_grey_modes(hf, mode):
    im = Image.fromarray(photo(110, 130)[..., 1]).convert(mode)
    data = encode(im, "JPEG" if mode == "L" else "PNG" if mode == "1" else "TIFF")
    got = decode(data)
    assert got.mode == "RGB" and np.array_equal(np.array(got)[..., 0], np.array(got)[..., 2])
    assert_parity(hf["qwen3"], data, spec_from_preprocessor_config(QWEN3))


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF"])
def test_other_formats_decode(hf, fmt):
    data = encode(photo(90, 110), fmt)
    assert decode(data).size == (110, 90)
    assert_parity(hf["qwen3"], data, spec_from_preprocessor_config(QWEN3))


def test_animated_gif_gives_its_first_frame():
    frames = [Image.fromarray(np.full((40, 50, 3), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode(buf.getvalue()).getpixel((0, 0)) == (10, 10, 10)


# --- errors -----------------------------------------------------------------------------------------------------

def kind_of(data: bytes, spec: ImageSpec | None = None) -> str:
    with pytest.raises(ImageError) as e:
        prepare(data, spec or spec_from_preprocessor_config(QWEN2))
    msg = str(e.value)
    assert 0 < len(msg) < 120 and "\n" not in msg
    return e.value.kind


def test_truncated_jpeg_is_an_error_not_a_grey_image():
    data = encode(photo(200, 300), "JPEG", quality=90)
    assert kind_of(data[: len(data) // 2]) == "truncated"
    assert kind_of(data[:-20]) == "truncated"


def test_empty_random_and_unsupported_bytes():
    assert kind_of(b"") == "empty"
    assert kind_of(np.random.default_rng(0).bytes(5000)) == "not_image"
    assert kind_of(b"<html>not found</html>") == "not_image"
    assert kind_of(encode(photo(32, 32), "ICO")) == "unsupported"


def test_decompression_bomb_is_refused_from_the_header():
    small = encode(photo(64, 64), "PNG")
    spec = ImageSpec(**{**spec_from_preprocessor_config(QWEN2).__dict__, "max_decode_pixels": 64 * 63})
    assert kind_of(small, spec) == "bomb"
    assert prepare(small, spec_from_preprocessor_config(QWEN2))[0].size > 0
    # a real PNG header claiming 100000 x 100000 pixels over a few bytes of data: refused before decoding,
    # or it would be reported as truncated
    lying = png_bytes(100_000, 100_000, 8, 2, b"\x00" * 100)
    assert kind_of(lying) == "bomb"
    assert kind_of(png_bytes(10_000, 9_000, 8, 2, b"\x00" * 100)) == "bomb"
    assert kind_of(png_bytes(9000, 9900, 8, 6, b"\x00" * 100)) == "bomb"  # 89.1 MP, under PIL's own limit


def test_aspect_ratio_over_200_is_refused():
    assert kind_of(encode(photo(3, 900), "PNG")) == "aspect"
    assert kind_of(encode(photo(900, 3), "PNG")) == "aspect"
    assert prepare(encode(photo(3, 600), "PNG"), spec_from_preprocessor_config(QWEN2))[1][0] == 1  # 200:1 is fine


def test_smart_resize_matches_transformers_everywhere():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    sizes = [(3, 3), (1, 1), (1, 150), (27, 29), (14, 14)] + [tuple(rng.integers(1, 5000, 2)) for _ in range(400)]
    for h, w in sizes:
        for factor, lo, hi in ((28, 3136, 12845056), (32, 65536, 16777216), (28, 112 * 112, 320 * 320)):
            try:
                want = hf_smart_resize(int(h), int(w), factor, lo, hi)
            except ValueError:
                with pytest.raises(ImageError) as e:
                    smart_resize(int(h), int(w), factor, lo, hi)
                assert e.value.kind == "aspect"
                continue
            assert smart_resize(int(h), int(w), factor, lo, hi) == want


def test_tiny_image_is_enlarged_and_only_an_empty_grid_is_too_small():
    assert smart_resize(3, 3, 28, 3136, 12845056) == (56, 56)
    with pytest.raises(ImageError) as e:
        smart_resize(3, 3, 28, 0, 12845056)  # transformers would return a 0x0 image
    assert e.value.kind == "too_small"


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(ImageError) as e:
        read_path(str(tmp_path / "nope.jpg"))
    assert e.value.kind == "missing" and "nope.jpg" in str(e.value)
    (tmp_path / "a.png").write_bytes(b"x")
    assert read_path(str(tmp_path / "a.png")) == b"x"
    assert read_path(f"file://{tmp_path}/a.png") == b"x"


def test_image_error_survives_pickling_between_processes():
    e = pickle.loads(pickle.dumps(ImageError("the image file is truncated", "truncated")))
    assert e.kind == "truncated" and str(e) == "the image file is truncated"


def test_module_does_not_import_torch():
    code = "import sys, po_batch.prep.image; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# --- size and memory caps ---------------------------------------------------------------------------------------

def cap(**kw) -> ImageSpec:
    return ImageSpec(**{**spec_from_preprocessor_config(QWEN2).__dict__, **kw})


def read_error(path: str, max_bytes: int = 1 << 20) -> ImageError:
    with pytest.raises(ImageError) as e:
        read_path(path, max_bytes)
    return e.value


def test_special_files_and_folders_are_not_read():
    """A FIFO would block, /dev/zero and /dev/urandom never end: in a subprocess with 60 s and 1 GiB of address
    space, so that a regression fails instead of hanging or eating the machine's memory."""
    code = """if True:
        import os, sys, tempfile
        from po_batch.prep.image import ImageError, read_path
        d = tempfile.mkdtemp()
        os.mkfifo(f"{d}/fifo.jpg")
        os.mkdir(f"{d}/dir.jpg")
        for path in (f"{d}/fifo.jpg", "/dev/zero", "/dev/urandom", f"{d}/dir.jpg", f"file://{d}/fifo.jpg",
                     f"file://{d}/dir.jpg"):
            try:
                read_path(path)
                print(path, "read")
            except ImageError as e:
                print(e.kind, path in str(e))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)))
    assert r.stdout.split("\n") == ["not_file True"] * 6 + [""], r.stdout + r.stderr


def test_a_file_over_the_cap_is_refused_from_its_size_and_never_read_past_it(tmp_path):
    exact = tmp_path / "exact.jpg"
    exact.write_bytes(b"x" * 1000)
    assert read_path(str(exact), 1000) == b"x" * 1000
    assert read_error(str(exact), 999).kind == "too_large"
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.truncate(10 << 30)  # says 10 GiB, holds no block: read whole, it would be 10 GiB of memory
    e = read_error(str(sparse))
    assert e.kind == "too_large" and "image.max_file_bytes" in str(e) and str(sparse) in str(e)
    # /proc files say size 0 and hold more: only the bounded read can tell
    assert len(read_path("/proc/self/maps", 1 << 20)) > 100
    assert read_error("/proc/self/maps", 100).kind == "too_large"


def test_fsspec_urls_are_checked_from_their_info_and_read_bounded(tmp_path):
    import fsspec

    with fsspec.open("memory://caps/big.jpg", "wb") as f:
        f.write(b"x" * 5000)
    assert read_path("memory://caps/big.jpg", 5000) == b"x" * 5000
    assert read_error("memory://caps/big.jpg", 4999).kind == "too_large"
    assert read_error("memory://caps").kind == "not_file"


def test_bytes_over_the_cap_are_too_large():
    data = encode(photo(64, 64), "PNG")
    assert kind_of(data, cap(max_file_bytes=len(data) - 1)) == "too_large"
    assert prepare(data, cap(max_file_bytes=len(data)))[0].size > 0


def test_a_jpeg_over_the_pixel_cap_decodes_at_the_least_dct_reduction_that_fits():
    data = encode(photo(1000, 1200), "JPEG", quality=90)
    for limit, size in ((1_200_000, (1200, 1000)), (400_000, (600, 500)), (100_000, (300, 250)),
                        (20_000, (150, 125))):
        im = decode(data, cap(max_decode_pixels=limit))
        ref = Image.open(io.BytesIO(data))
        ref.draft("RGB", size)
        assert im.size == size and np.array_equal(np.array(im), np.array(ref.convert("RGB")))
    pixels, grid = prepare(data, cap(max_decode_pixels=400_000))
    spec = cap()
    assert pixels.shape[:2] == smart_resize(500, 600, spec.factor, spec.min_pixels, spec.max_pixels)
    assert kind_of(data, cap(max_decode_pixels=18_000)) == "bomb"  # 1/8 is as far as libjpeg goes
    assert kind_of(encode(photo(1000, 1200), "PNG"), cap(max_decode_pixels=400_000)) == "bomb"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency", "I;16", "RGB"])
def test_images_of_several_strips_convert_and_resize_exactly_as_one(hf, mode):
    """Over _STRIP_PIXELS, conversion to RGB and the copies of resize go strip by strip; transformers sees the
    whole image at once."""
    from po_batch.prep.image import _STRIP_PIXELS

    h, w = 1100, 1700
    assert h * w > 1.5 * _STRIP_PIXELS
    arr = photo(h, w)
    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    if mode == "RGBA":
        im = Image.fromarray(np.dstack([arr, alpha]))
    elif mode == "LA":
        im = Image.fromarray(np.dstack([arr[..., 0], alpha]), "LA")
    elif mode == "P+transparency":
        im = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode == "I;16":
        im = Image.fromarray((arr[..., 0].astype(np.uint16) * 3))
    else:
        im = Image.fromarray(arr)
    data = encode(im, "PNG", **({"transparency": 0} if mode == "P+transparency" else {}))
    assert_parity(hf["qwen2"], data, spec_from_preprocessor_config(QWEN2))


def test_peak_memory_of_a_worker_for_the_biggest_rgba_png_under_the_cap():
    """A 6000x6600 RGBA PNG (39.6 MP) -> prepare(), in a subprocess that reports its peak RSS over what it held
    before. Converting the whole image at once (RGBA copy, white RGBA, composite, RGB) and PIL's tobytes behind
    np.asarray took 611 MiB, 16 bytes a pixel; strip by strip it is 364 MiB."""
    code = """if True:
        import struct, zlib
        from pathlib import Path
        from po_batch.prep.image import prepare, spec_from_preprocessor_config
        w, h = 6000, 6600
        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        rows = (b"\\x00" + bytes(range(256)) * (4 * w // 256) + bytes(4 * w % 256)) * h
        png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))
        del rows
        spec = spec_from_preprocessor_config({"patch_size": 16, "min_pixels": 65536, "max_pixels": 16777216})
        def status(key):
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
            return int(line.split()[1]) * 1024
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = status("VmRSS")
        pixels, grid = prepare(png, spec)
        print(status("VmHWM") - before, grid)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    peak, grid = r.stdout.split(" ", 1)
    assert grid.strip() == "(1, 268, 244)"
    assert int(peak) < 12 * 6000 * 6600, f"peak {int(peak) / 2**20:.0f} MiB"


# --- preprocessor configs -----------------------------------------------------------------------------------------

def test_spec_from_published_configs():
    q2 = spec_from_preprocessor_config(published("Qwen2-VL-2B-Instruct"))
    assert (q2.patch_size, q2.merge_size, q2.temporal_patch_size, q2.min_pixels, q2.max_pixels, q2.factor) == \
        (14, 2, 2, 3136, 12845056, 28)
    assert q2.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert spec_from_preprocessor_config(published("Qwen2.5-VL-3B-Instruct")) == q2
    q3 = spec_from_preprocessor_config(published("Qwen3-VL-2B-Instruct"))
    assert (q3.patch_size, q3.min_pixels, q3.max_pixels, q3.image_mean, q3.factor) == \
        (16, 65536, 16777216, (0.5, 0.5, 0.5), 32)
    user = spec_from_preprocessor_config(QWEN3, min_pixels=1024, max_pixels=200_000)
    assert (user.min_pixels, user.max_pixels) == (1024, 200_000)


def test_spec_from_configs_transformers_5_saves(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoImageProcessor, AutoVideoProcessor, PreTrainedTokenizerFast, Qwen2VLImageProcessor, \
        Qwen3VLProcessor

    Qwen2VLImageProcessor(min_pixels=5000, max_pixels=90000, patch_size=16).save_pretrained(tmp_path / "ip")
    saved = json.loads((tmp_path / "ip/preprocessor_config.json").read_text())
    assert "size" in saved and "min_pixels" not in saved
    spec = spec_from_preprocessor_config(saved)
    assert (spec.min_pixels, spec.max_pixels, spec.patch_size) == (5000, 90000, 16)

    specials = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", additional_special_tokens=specials)
    pub = CONFIGS / "Qwen3-VL-2B-Instruct"
    Qwen3VLProcessor(image_processor=AutoImageProcessor.from_pretrained(pub), tokenizer=tok,
                     video_processor=AutoVideoProcessor.from_pretrained(pub)).save_pretrained(tmp_path / "proc")
    assert not (tmp_path / "proc/preprocessor_config.json").exists()  # transformers 5 nests it instead
    nested = json.loads((tmp_path / "proc/processor_config.json").read_text())
    assert spec_from_preprocessor_config(nested) == spec_from_preprocessor_config(published("Qwen3-VL-2B-Instruct"))


def test_flat_pixel_keys_win_over_size_as_in_transformers():
    cfg = {"min_pixels": 3136, "max_pixels": 9999, "size": {"shortest_edge": 1, "longest_edge": 2}}
    spec = spec_from_preprocessor_config(cfg)
    assert (spec.min_pixels, spec.max_pixels) == (3136, 9999)


def test_unsupported_preprocessing_is_a_config_error():
    with pytest.raises(ValueError, match="resample"):
        spec_from_preprocessor_config({**QWEN2, "resample": 2})
    with pytest.raises(ValueError, match="min_pixels"):
        spec_from_preprocessor_config(QWEN2, min_pixels=10**9)
