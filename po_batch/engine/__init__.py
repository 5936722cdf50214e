"""The GPU side: packing samples into varlen batches, the forward loop, and task heads."""
