"""Image decode, validation and resize on the CPU (numpy + PIL, no torch), pixel for pixel as transformers' image
processors decode and resize; and the Qwen-VL image processor (ImageSpec: smart_resize, merge-block patches, M-RoPE
offsets), what transformers' default Qwen-VL image processor feeds the vision tower. Other families' processors
build on decode and resize (see prep/families.py)."""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import BmpImagePlugin, GifImagePlugin, Image, ImageOps, JpegImagePlugin, PngImagePlugin  # noqa: F401
from PIL import TiffImagePlugin, WebPImagePlugin  # noqa: F401  (imported to register only these decoders)

from po_batch.prep.patches import to_patches
from po_batch.sample import Picture

# the decoders tried, in order; JPEG covers MPO (multi-picture camera JPEGs). A Pillow built without one skips it.
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)

# The defaults of config.py's image.max_decode_pixels and image.max_file_bytes (documented there): 40 MP decodes to
# 160 MB of RGBA, which keeps a worker under ~0.5 GB; 64 MiB holds any camera JPEG or web PNG of that size.
MAX_DECODE_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 << 20


class ImageError(Exception):
    """A row's image cannot be used. str() is a short reason for the output's error column; .kind a category:
    empty, not_image, unsupported, truncated, decode, bomb, too_small, aspect, missing, not_file, too_large."""

    def __init__(self, message: str, kind: str):
        super().__init__(message, kind)
        self.message, self.kind = message, kind

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ImageSpec:
    """A checkpoint's image preprocessing, resolved from its preprocessor config and the user's overrides."""
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # a bigger source is decoded reduced (JPEG) or refused before decoding; PIL itself refuses any image over twice
    # Image.MAX_IMAGE_PIXELS (179 MP), whatever this says
    max_decode_pixels: int = MAX_DECODE_PIXELS
    max_file_bytes: int = MAX_FILE_BYTES  # a bigger image file or Parquet value is refused, and never read whole

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def __call__(self, im: Image.Image) -> Picture:
        """The Qwen-VL image processor: a decoded RGB image at smart_resize's size, cut into patches."""
        h, w = smart_resize(im.height, im.width, self.factor, self.min_pixels, self.max_pixels)
        return self.picture(resize(im, h, w))

    def picture(self, pixels: np.ndarray) -> Picture:
        """Resized (h, w, 3) uint8 pixels -> their patches in merge-block order and the image's M-RoPE offsets:
        (t, h, w) = (0, row, col) over its grid of merged tokens; the text after it resumes max(rows, cols) ahead,
        as in Qwen2/2.5/3-VL for a still image."""
        h, w = pixels.shape[0] // self.patch_size, pixels.shape[1] // self.patch_size
        gh, gw = h // self.merge_size, w // self.merge_size
        rows, cols = np.divmod(np.arange(gh * gw, dtype=np.int32), gw)
        return Picture(to_patches(pixels, self.patch_size, self.merge_size), (1, h, w),
                       np.stack([np.zeros_like(rows), rows, cols]), max(gh, gw))

    def reference_kwargs(self) -> dict:
        """What transformers' processor is given to prepare the same pixels (verify): the resolved pixel range."""
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


# Qwen2VLImageProcessor's class defaults, used where a preprocessor config leaves a key out
_DEFAULTS = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                 image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))


def spec_from_preprocessor_config(cfg: dict, min_pixels: int | None = None, max_pixels: int | None = None) -> ImageSpec:
    """Reads every layout Qwen-VL checkpoints ship: flat `min_pixels`/`max_pixels` (Qwen2/2.5-VL), `size:
    {shortest_edge, longest_edge}` (Qwen3-VL and anything transformers 5 saves; pixel counts, not edges), and a
    transformers-5 processor_config.json with the image processor nested under `image_processor`. Flat keys win
    over `size`, as in transformers; the user's min_pixels/max_pixels win over both."""
    cfg = cfg.get("image_processor", cfg)
    for key, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("do_convert_rgb", True),
                      ("resample", 3)):
        if cfg.get(key, want) != want:
            raise ValueError(f"preprocessor config: {key}={cfg[key]!r} is not supported (po-batch needs {want!r})")
    if not math.isclose(cfg.get("rescale_factor", 1 / 255), 1 / 255):
        raise ValueError(f"preprocessor config: rescale_factor={cfg['rescale_factor']!r} is not supported "
                         "(po-batch needs 1/255)")
    size = cfg.get("size") or {}
    if set(size) - {"shortest_edge", "longest_edge", "min_pixels", "max_pixels"}:
        raise ValueError(f"preprocessor config: size={size} is not a Qwen pixel range (shortest_edge, longest_edge)")
    lo = _first(min_pixels, cfg.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"),
                _DEFAULTS["min_pixels"])
    hi = _first(max_pixels, cfg.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"),
                _DEFAULTS["max_pixels"])
    if not 0 < lo <= hi:
        raise ValueError(f"image pixel limits: need 0 < min_pixels <= max_pixels, got {lo} and {hi}")
    get = lambda k: cfg.get(k, _DEFAULTS[k])  # noqa: E731
    return ImageSpec(int(get("patch_size")), int(get("merge_size")), int(get("temporal_patch_size")), int(lo), int(hi),
                     tuple(float(v) for v in get("image_mean")), tuple(float(v) for v in get("image_std")))


def _first(*values):
    return next(v for v in values if v is not None)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen resizes to: multiples of `factor`, pixel count within [min_pixels, max_pixels],
    aspect ratio kept. transformers' arithmetic exactly (its float rounding included), with ImageErrors where
    transformers raises (aspect over 200) or would produce an empty image. transformers 5 does not refuse sides
    below `factor`: a 3x3 image is enlarged to the min_pixels grid, and so is it here."""
    if min(height, width) < 1:
        raise ImageError(f"image is {width}x{height} pixels", "too_small")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is over the limit of 200:1",
                         "aspect")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        raise ImageError(f"image is {width}x{height} pixels, too small for {factor}-pixel patches", "too_small")
    return h_bar, w_bar


def decode(data: bytes, spec: ImageSpec | None = None) -> Image.Image:
    """Bytes of a JPEG, PNG, WebP, GIF (first frame), BMP or TIFF -> an upright RGB PIL image, converted as
    transformers' Qwen processors convert (transparency composited onto white; other modes through PIL's
    convert("RGB"), which clips 16- and 32-bit grey to 255). Header dimensions are checked before any pixel is
    decoded: over spec.max_decode_pixels, a JPEG is decoded reduced (see _reduce), anything else refused. A
    truncated file is an error, never a partly grey image."""
    spec = spec or ImageSpec  # its class attributes are the defaults
    if not data:
        raise ImageError("the image is empty (0 bytes)", "empty")
    if len(data) > spec.max_file_bytes:
        raise ImageError(_too_large(len(data), spec.max_file_bytes), "too_large")
    with warnings.catch_warnings():  # PIL warns on odd EXIF and on big images; the outcome is decided here
        warnings.simplefilter("ignore")
        im = _open(data)
        if im.width * im.height > spec.max_decode_pixels:
            _reduce(im, spec.max_decode_pixels)
        try:
            im.load()
        except Exception as e:  # PIL says "truncated" in an OSError; other damage raises whatever the decoder does
            if isinstance(e, OSError) and "truncated" in str(e).lower():
                raise ImageError("the image file is truncated", "truncated") from None
            raise ImageError(f"the {im.format} image could not be decoded ({e})", "decode") from None
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception:  # unreadable EXIF: the stored orientation is all there is
            pass
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    try:
        return _to_rgb(im)
    except ValueError:  # a mode PIL cannot convert
        raise ImageError(f"{im.mode} images are not supported", "unsupported") from None


def _reduce(im: Image.Image, limit: int) -> None:
    """A JPEG over `limit` pixels is set to decode at 1/2, 1/4 or 1/8 scale, the least reduction that fits: libjpeg
    scales in the DCT, so the full-size pixels never exist. Such a row differs from transformers' processor, which
    decodes full size and resizes from there. Other formats cannot decode reduced: over the limit, they are refused."""
    if im.format in ("JPEG", "MPO"):
        w, h = im.size
        s = next((s for s in (2, 4, 8) if -(-w // s) * -(-h // s) <= limit), 8)
        im.draft(None, (max(1, w // s), max(1, h // s)))  # PIL picks the largest scale that keeps this size
    if im.width * im.height > limit:
        raise ImageError(f"the image is {im.width}x{im.height} pixels, over the limit of {limit} "
                         "(image.max_decode_pixels)", "bomb")


# Pixels converted or copied at a time: converting a whole image to RGB through RGBA makes three full-size RGBA
# temporaries (1 GB for a 9000x9900 PNG), strip by strip they stay this small. Most web images fit in one strip.
_STRIP_PIXELS = 1 << 20


def _to_rgb(im: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb, which the torchvision and PIL Qwen processors both call on PIL
    input, strip by strip: every step is per pixel, so the strips put together are the whole image's result."""
    alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    rows = max(1, _STRIP_PIXELS // im.width)
    if im.height <= rows:
        return _strip_to_rgb(im, alpha)
    out = Image.new("RGB", im.size)
    for y in range(0, im.height, rows):
        out.paste(_strip_to_rgb(im.crop((0, y, im.width, min(y + rows, im.height))), alpha), (0, y))
    return out


def _strip_to_rgb(im: Image.Image, alpha: bool) -> Image.Image:
    if alpha:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def _too_large(size: int, limit: int) -> str:
    return f"the image file is {size} bytes, over the limit of {limit} (image.max_file_bytes)"


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # PIL's own check, at twice Image.MAX_IMAGE_PIXELS
        raise ImageError(f"the image is over {2 * Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?)",
                         "bomb") from None
    except Image.UnidentifiedImageError:
        pass
    except Exception as e:  # a known format whose header is broken
        raise ImageError(f"the image header could not be read ({e})", "decode") from None
    try:  # name the format only to say it is not one we decode
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:
        raise ImageError("the data is not an image file", "not_image") from None
    raise ImageError(f"{fmt} images are not supported", "unsupported")


def prepare(data: bytes, spec: ImageSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Bytes -> (C-contiguous uint8 (h, w, 3) pixels at smart_resize's size, grid (t, h, w) in patches)."""
    im = decode(data, spec)
    h, w = smart_resize(im.height, im.width, spec.factor, spec.min_pixels, spec.max_pixels)
    return resize(im, h, w), (1, h // spec.patch_size, w // spec.patch_size)


def read_path(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A local path or an fsspec URL -> its bytes. Only a regular file of at most max_bytes is opened, and no more
    than max_bytes + 1 bytes of it are read: a FIFO or a device would block or never end, a file can grow after
    its size was checked, and a remote store may not say the size at all."""
    try:
        if "://" in path:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(path)
            info = fs.info(inner)
            size = _checked_size(path, info.get("type", "file") == "file", info.get("size"), max_bytes)
            with fs.open(inner, "rb") as f:
                return _read_bounded(f, path, size, max_bytes)
        st = os.stat(path)
        size = _checked_size(path, stat.S_ISREG(st.st_mode), st.st_size, max_bytes)
        # O_NONBLOCK: a path swapped for a FIFO since the stat then reads as empty instead of waiting for a writer
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            return _read_bounded(f, path, size, max_bytes)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}", "missing") from None
    except OSError as e:
        raise ImageError(f"image file cannot be read: {path} ({e.strerror or e})", "missing") from None


def _checked_size(path: str, regular: bool, size: int | None, max_bytes: int) -> int:
    if not regular:
        raise ImageError(f"the image path is not a regular file: {path}", "not_file")
    if size is not None and size > max_bytes:
        raise ImageError(f"{_too_large(size, max_bytes)}: {path}", "too_large")
    return size or 0


def _read_bounded(f, path: str, size: int, max_bytes: int) -> bytes:
    """The file's bytes in one read when it holds the `size` it said (read(n) allocates n bytes up front, so never
    read(max_bytes) for a small file); in pieces up to max_bytes + 1 when it holds more (it grew, or its size is
    unknown: /proc files say 0)."""
    data = f.read(size + 1)
    if len(data) > size:
        parts, n = [data], len(data)
        while n <= max_bytes and (part := f.read(min(1 << 20, max_bytes + 1 - n))):
            parts.append(part)
            n += len(part)
        if n > max_bytes:
            raise ImageError(f"the image file is over the limit of {max_bytes} bytes (image.max_file_bytes): "
                             f"{path}", "too_large")
        data = b"".join(parts)
    return data


# --- resize --------------------------------------------------------------------------------------------------
# transformers' default Qwen image processor (the torchvision one) resizes the uint8 CHW tensor with
# tvF.resize(BICUBIC, antialias=True). On CPU torch runs that in fixed point (UpSampleKernel.cpp,
# `_compute_index_ranges_int16_weights` + the separable uint8 loops): per axis, Keys-cubic (a=-0.5) antialias
# weights in double, normalised, rounded to int16 at a precision p chosen from the largest weight; each output is
# (sum(w * x) + 2^(p-1)) >> p clamped to 0..255; width first, then height, uint8 in between. PIL's bicubic is the
# same algorithm at a fixed 22-bit precision and differs by 1 on ~0.3% of pixels, so torch's is reproduced here,
# exactly. The integer sums run as banded GEMMs in BLAS: on x - 128 with weights scaled by 2^-p, every partial sum
# is an integer (times 2^-p) below 2^24, so float32 is exact (float64, below 2^53, for the rare larger weights).


def _cubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _int16_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """torch's (first input, tap count, int16 weights [n_out, taps], precision) for one axis."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n_in) - first, 0, taps)
    k = np.arange(taps)
    w = _cubic((k + first[:, None] - center[:, None] + 0.5) * (1.0 / scale if scale >= 1.0 else 1.0))
    w[k >= count[:, None]] = 0.0
    total = np.zeros(n_out)
    for j in range(taps):  # in tap order, as the C loop adds them
        total += w[:, j]
    norm = total != 0  # as in C, a row whose weights sum to 0 stays unnormalised and out of the max
    w[norm] /= total[norm, None]
    wmax, prec = w[norm].max(initial=0.0), 0
    while prec < 22 and int(0.5 + wmax * (1 << (prec + 1))) < (1 << 15):
        prec += 1
    v = w * (1 << prec)
    return first, count, np.trunc(v + np.where(v < 0, -0.5, 0.5)).astype(np.int64), prec


_BLOCK_IN = 8    # inputs a GEMM block reads: small, as the band is narrow and BLAS does well with a long N
_CHUNK_OUT = 32  # output rows converted and rounded together, so that the float work stays in cache


@lru_cache(maxsize=256)
def _axis_plan(n_in: int, n_out: int) -> tuple[type, tuple]:
    """One axis as banded GEMMs: (dtype, chunks). A chunk is (out0, out1, in0, in1, blocks, r, q): its blocks are
    (out0, out1, in0, in1, weights * 2^-p) relative to the chunk, a GEMM of x - 128 gives sum(w * (x - 128)) / 2^p,
    and output = floor(GEMM + r) + q, with q an integer and q + r = (128 * sum(w) + 2^(p-1)) / 2^p: the offset
    and torch's rounding term put back. Where GEMM + q + r is itself exact (float64, or the true sum stays below
    2^24), q is None and r holds both: the cast's truncation then does the floor."""
    first, count, wi, prec = _int16_weights(n_in, n_out)
    exact32 = 128 * np.abs(wi).sum(1).max() + (1 << prec) < 2**24
    dtype = np.float32 if exact32 else np.float64
    const = 128 * wi.sum(1) + (1 << (prec - 1))
    q, r = np.divmod(const, 1 << prec)
    if dtype is np.float64 or 255 * np.clip(wi, 0, None).sum(1).max() + (1 << prec) < 2**24:
        q, r = None, const
    rows = max(1, round(_BLOCK_IN * n_out / n_in))  # outputs per block
    chunks = []
    for c0 in range(0, n_out, _CHUNK_OUT):
        c1 = min(c0 + _CHUNK_OUT, n_out)
        ci0, ci1 = int(first[c0:c1].min()), int((first[c0:c1] + count[c0:c1]).max())
        blocks = []
        for o0 in range(c0, c1, rows):
            o1 = min(o0 + rows, c1)
            f, c, w = first[o0:o1], count[o0:o1], wi[o0:o1]
            i0, i1 = int(f.min()), int((f + c).max())
            m = np.zeros((o1 - o0, i1 - i0), dtype=dtype)
            j, k = np.nonzero(np.arange(w.shape[1]) < c[:, None])
            m[j, f[j] - i0 + k] = w[j, k] / (1 << prec)
            blocks.append((o0 - c0, o1 - c0, i0 - ci0, i1 - ci0, m))
        chunks.append((c0, c1, ci0, ci1, tuple(blocks), (r[c0:c1, None] / (1 << prec)).astype(dtype),
                       None if q is None else q[c0:c1, None].astype(dtype)))
    return dtype, tuple(chunks)


def _resample_rows(x: np.ndarray, n_out: int) -> np.ndarray:
    """uint8 (n_in, N) -> uint8 (n_out, N), resampling along axis 0."""
    dtype, chunks = _axis_plan(x.shape[0], n_out)
    out = np.empty((n_out, x.shape[1]), dtype=np.uint8)
    y = np.empty((_CHUNK_OUT, x.shape[1]), dtype=dtype)
    for c0, c1, ci0, ci1, blocks, r, q in chunks:
        xf = np.subtract(x[ci0:ci1], 128, dtype=dtype)
        for o0, o1, i0, i1, m in blocks:
            np.matmul(m, xf[i0:i1], out=y[o0:o1])
        yc = y[: c1 - c0]
        yc += r
        if q is not None:
            np.floor(yc, out=yc)
            yc += q
        np.clip(yc, 0, 255, out=yc)
        out[c0:c1] = yc  # truncates, which is floor once clipped to >= 0
    return out


def resize(im: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB PIL image -> C-contiguous uint8 (height, width, 3), equal to transformers' torchvision resize."""
    w0, h0 = im.size
    if w0 != width:  # along x on the transposed image, so that every GEMM reads and writes whole rows
        yt = _resample_rows(_array(im, transposed=True).reshape(w0, h0 * 3), width).reshape(width, h0, 3)
        x = _array(yt, transposed=True)
    else:
        x = _array(im)
    if h0 != height:
        return _resample_rows(x.reshape(h0, width * 3), height).reshape(height, width, 3)
    return np.require(x, requirements="W")  # _array's may be read-only


def _array(src: Image.Image | np.ndarray, transposed: bool = False) -> np.ndarray:
    """An RGB PIL image or uint8 (h, w, 3) array -> uint8 (h, w, 3), or (w, h, 3) transposed (by PIL, the fastest
    here); read-only when it fits in one strip. A bigger image goes strip by strip: whole, it would be copied three
    times more (PIL's own copy, a transposed copy, and tobytes joining its pieces behind np.asarray)."""
    pil = isinstance(src, Image.Image)
    h, w = (src.height, src.width) if pil else src.shape[:2]
    rows = max(1, _STRIP_PIXELS // w)
    if h <= rows:
        im = src if pil else Image.fromarray(src)
        return np.asarray(im.transpose(Image.Transpose.TRANSPOSE) if transposed else im)
    out = np.empty((w, h, 3) if transposed else (h, w, 3), np.uint8)
    for y in range(0, h, rows):
        strip = src.crop((0, y, w, min(y + rows, h))) if pil else Image.fromarray(src[y:y + rows])
        if transposed:
            out[:, y:y + rows] = np.asarray(strip.transpose(Image.Transpose.TRANSPOSE))
        else:
            out[y:y + rows] = np.asarray(strip)
    return out
