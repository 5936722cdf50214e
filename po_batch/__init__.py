"""po-batch: prefill-only batch scoring of image corpora with Qwen-VL models."""

__version__ = "0.1.0"
