"""Model families (one file each), the registry and the safetensors loader."""
