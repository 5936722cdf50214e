"""Finding a checkpoint (local HF-format directory or hub id) and loading its safetensors weights strictly.

Weights go straight into the target dtype and device, tensor by tensor: no float32 copy of the model in RAM.
Every checkpoint tensor must land in a parameter of the same shape and every parameter must be filled."""

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from po_batch.layers.linear import MergedLinear


class ModelError(Exception):
    """A checkpoint problem, explained in one sentence for the user."""


HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def resolve(path: str) -> Path:
    """A local directory, or a hub id downloaded (safetensors only) into the HF cache on first use."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} has no config.json: model.path must be an HF-format checkpoint directory")
        return local
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelError(f"model.path {path!r} is neither a checkpoint directory nor a hub id like 'Qwen/Qwen3-VL-2B-Instruct'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(path, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, no permission: one clear sentence either way
        raise ModelError(f"could not download {path!r} from the Hugging Face hub ({type(e).__name__}); "
                         f"without network access set model.path to a local checkpoint directory") from None


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelError(f"{model_dir} has only pickled weights (.bin/.pt); po-batch loads safetensors only "
                         f"(convert the checkpoint with transformers' save_pretrained(safe_serialization=True))")
    raise ModelError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def identity(model_dir: Path) -> str:
    """A fingerprint of the checkpoint that survives copying: config.json and every byte of every weight file.
    Each file's digest is computed once and cached by (path, size, mtime) in the user's cache folder."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    cache = _DigestCache()
    for f in weight_files(model_dir):
        h.update(f"{f.name}:{cache.digest(f)}".encode())
    cache.save()
    return h.hexdigest()[:16]


class _DigestCache:
    """blake2b digests of weight files, keyed by resolved path, size and mtime; a cache that cannot be read or
    written is simply not used."""

    def __init__(self):
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = root / "po-batch" / "weight-digests.json"
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, f: Path) -> str:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self.entries:
            with open(f, "rb") as fh:
                self.entries[key] = hashlib.file_digest(fh, "blake2b").hexdigest()[:32]
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:
            pass


def load_weights(model: nn.Module, model_dir: Path, renames: list[tuple[str, str]], packed: dict,
                 tie: bool, unused: list[str] = ()) -> None:
    """Copy every checkpoint tensor into its parameter; refuse missing, unexpected or misshapen tensors.
    `unused`: patterns of checkpoint tensors deliberately left unread (an LM head that no task reads)."""
    params = dict(model.named_parameters())
    tie = tie and "lm_head.weight" in params  # a bare decoder (Gemma2Model) has no head to tie
    skip = [re.compile(p) for p in unused]
    if tie:
        params.pop("lm_head.weight", None)
    fused = {n: m for n, m in model.named_modules() if isinstance(m, MergedLinear)}
    owner = {n: fused.get(n.rpartition(".")[0]) for n in params}
    needed = {(n, s) for n in params for s in (range(len(owner[n].out_sizes)) if owner[n] else [None])}
    rules = [(re.compile(a), b) for a, b in renames]
    unexpected = []
    for f in weight_files(model_dir):
        with safe_open(f, "pt", device="cpu") as st:
            for key in st.keys():
                if IGNORED.search(key) or (tie and key == "lm_head.weight") or any(rx.search(key) for rx in skip):
                    continue
                name = key
                for rx, repl in rules:
                    name = rx.sub(repl, name)
                shard = None
                for piece, (fused, idx) in packed.items():
                    if f".{piece}." in name:
                        name, shard = name.replace(f".{piece}.", f".{fused}."), idx
                        break
                param = params.get(name)
                if param is None or (name, shard) not in needed:
                    unexpected.append(key)
                    continue
                tensor = st.get_tensor(key)
                try:
                    if shard is None:
                        if tensor.shape != param.shape:
                            raise ValueError(f"expected shape {tuple(param.shape)}, checkpoint has {tuple(tensor.shape)}")
                        param.data.copy_(tensor)
                    else:
                        owner[name].load_shard(param, tensor, shard)
                except ValueError as e:
                    raise ModelError(f"{f.name}: tensor {key!r}: {e}") from None
                needed.discard((name, shard))
    if unexpected:
        raise ModelError(f"{model_dir}: the checkpoint has tensors this model does not use: {_few(unexpected)} "
                         f"(a renamed layer or a different architecture than config.json says)")
    if needed:
        missing = sorted(n if s is None else f"{n}[shard {s}]" for n, s in needed)
        if missing == ["lm_head.weight"]:
            raise ModelError(f"{model_dir}: the checkpoint has no LM head (it was saved without one, as embedding "
                             f"models are), and this task reads its logits; task.type: embed needs none")
        raise ModelError(f"{model_dir}: the checkpoint lacks tensors the model needs: {_few(missing)}")
    if tie and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embeddings().weight


def _few(names: list[str], n: int = 5) -> str:
    head = ", ".join(repr(x) for x in names[:n])
    return head + (f" and {len(names) - n} more" if len(names) > n else "")


def build(cls, config: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Construct on the meta device and materialise directly in `dtype` on `device` (no initialisation pass)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to_empty(device=device).eval().requires_grad_(False)
