"""The results fingerprint follows everything of the checkpoint that changes scores: every weight byte, the
tokenizer, the chat template and the image limits as resolved from the preprocessor config (null in the config
means the checkpoint's)."""

import json
import shutil

import pytest

from po_batch.config import config_from_dict
from po_batch.spec import open_spec
from po_batch.tiny import build_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("spec") / "model", "qwen3_vl")


def fingerprint(model_dir, tmp_path) -> dict:
    cfg = config_from_dict({"model": {"path": str(model_dir), "device": "cpu"},
                            "input": {"paths": [str(tmp_path / "data.parquet")], "columns": ["category"]},
                            "task": {"prompt": "Is there a {category}? Answer yes or no."},
                            "output": {"path": str(tmp_path / "out")}, "run": {"workers": 0}})
    return open_spec(cfg, "cpu", "float32", 0).fingerprint()


def flip_weight_byte(d):
    """One byte of the last tensor's data, past any window a sampled hash would read."""
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))


def edit_tokenizer(d):
    doc = json.loads((d / "tokenizer.json").read_text())
    last = max(t["id"] for t in doc["added_tokens"])
    doc["added_tokens"].append({"id": last + 1, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(doc))


def edit_template(d):
    f = d / "chat_template.jinja"
    f.write_text(f.read_text().replace("<|im_start|>assistant\n", "<|im_start|>assistant\n\n"))


def edit_preprocessor(d):
    doc = json.loads((d / "preprocessor_config.json").read_text())
    doc["max_pixels"] //= 2
    (d / "preprocessor_config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, keys", [(flip_weight_byte, ["model.identity"]),
                                        (edit_tokenizer, ["model.tokenizer"]),
                                        (edit_template, ["model.chat_template"]),
                                        (edit_preprocessor, ["image.max_pixels"])])
def test_each_checkpoint_file_that_changes_scores_changes_the_fingerprint(model, tmp_path, edit, keys):
    base = fingerprint(model, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert fingerprint(copy, tmp_path) == base  # a copy of the same checkpoint resumes the same run
    edit(copy)
    changed = fingerprint(copy, tmp_path)
    assert [k for k in base if changed.get(k) != base[k]] == keys
