"""The error of the data layer that users see: unusable inputs or an unusable output directory."""


class PlanError(Exception):
    """A problem with the inputs or the output directory; the message is one line for the user."""


# fsspec backends po-batch ships an extra for
_EXTRAS = {"s3": "s3", "s3a": "s3"}


def backend_error(what: str, url: str, e: Exception) -> PlanError:
    """The error for a URL whose fsspec backend is missing (ImportError) or unknown (ValueError)."""
    proto = url.split("://", 1)[0]
    if isinstance(e, ValueError):
        return PlanError(f"{what} {url}: unknown protocol {proto}://")
    extra = _EXTRAS.get(proto)
    how = f"pip install 'po-batch[{extra}]'" if extra else str(e)
    return PlanError(f"{what} {url}: the {proto}:// backend is not installed; {how}")
