"""CPU prep: image decode/validate/resize, prompt rendering and tokenization, the worker-process pool."""
