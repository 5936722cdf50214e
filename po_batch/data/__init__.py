"""Plan, claims, readers and the atomic sink: everything po-batch keeps on disk."""
