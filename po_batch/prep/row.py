"""One row's prep, run in the pool's workers: decode the image and prepare it with the family's image processor,
render and tokenize the task's prompt, and hand back a Sample, or the row's error."""

from dataclasses import dataclass

from po_batch.prep.image import ImageError, decode, read_path
from po_batch.prep.pool import RowError
from po_batch.sample import Sample


@dataclass
class Prep:
    """What a worker needs, sent to it once."""
    prompt: object               # .encode(fields, picture) -> the Sample's token fields (the task's, tasks/)
    images: object | None        # the family's image processor (prep/families.py); None for text-only rows
    max_tokens: int              # run.batch_tokens: a longer row could never be packed

    def __call__(self, row: tuple[object, dict | list[dict]]) -> Sample | RowError:
        """row: (image bytes, a path or None; the prompt's fields, or a listwise block's list of its rows' fields)."""
        image, fields = row
        try:
            picture = None
            if self.images is not None:
                if image is None:
                    raise ImageError("the row has no image", "missing")
                data = read_path(image, self.images.max_file_bytes) if isinstance(image, str) else image
                picture = self.images(decode(data, self.images))
            pixels = {} if picture is None else {"patches": picture.patches, "grid": picture.grid,
                                                 "layout": picture.layout}
            sample = Sample(**self.prompt.encode(fields, picture), **pixels)
        except ImageError as e:
            return RowError(e.kind, str(e))
        except Exception as e:  # a bad row is data: whatever broke, it stays with the row
            return RowError("prep", f"{type(e).__name__}: {e}")
        if sample.tokens == 0:
            return RowError("empty", "the row's prompt has no tokens (its text is empty, with template: raw)")
        if sample.tokens > self.max_tokens:
            if sample.rows > 1:
                return RowError("too_long", f"the prompt of these {sample.rows} rows is {sample.tokens} tokens, over "
                                            f"run.batch_tokens ({self.max_tokens}); raise it or lower task.block")
            hint = " or lower image.max_pixels" if getattr(self.images, "max_pixels", None) else ""
            return RowError("too_long", f"the row is {sample.tokens} tokens, over run.batch_tokens "
                                        f"({self.max_tokens}); raise it{hint}")
        return sample
