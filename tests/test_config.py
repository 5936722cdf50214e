import textwrap
from pathlib import Path

import pytest

from po_batch.config import (
    ConfigError,
    config_from_dict,
    results_fingerprint,
    load_config,
    resolved_device,
    resolved_dtype,
    workers_count,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"

BASE = """\
model:
  path: /models/Qwen3-VL-2B-Instruct
input:
  paths: [data/*.parquet]
  columns: [category]
task:
  prompt: "Is there a {category} in this image? Answer yes or no."
output:
  path: out/run1
"""


def write(tmp_path, text, name="config.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load(tmp_path, text):
    return load_config(write(tmp_path, text))


def error(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_minimal_config_gets_the_documented_defaults(tmp_path):
    cfg = load(tmp_path, BASE)
    assert (cfg.model.dtype, cfg.model.device) == ("auto", "auto")
    assert (cfg.input.id_column, cfg.input.image_column) == ("id", "image")
    assert (cfg.task.type, cfg.task.yes, cfg.task.no) == ("yes_no", "yes", "no")
    assert (cfg.image.min_pixels, cfg.image.max_pixels) == (None, None)
    assert (cfg.run.batch_tokens, cfg.run.workers, cfg.run.rows_per_unit) == (16384, "auto", 4096)
    assert (cfg.run.claim_ttl_s, cfg.run.log_every_s, cfg.run.row_timeout_s) == (300, 30, 60)
    assert (cfg.image.max_decode_pixels, cfg.image.max_file_bytes) == (40_000_000, 64 * 2**20)


def test_image_caps_default_as_the_image_spec_does():
    from po_batch.prep.image import ImageSpec  # what prep uses when no config is involved (tests, verify's reads)

    image = config_from_dict({"model": {"path": "m"}, "input": {"paths": ["d"]}, "task": {"prompt": "p"},
                              "output": {"path": "o"}}).image
    assert (image.max_decode_pixels, image.max_file_bytes) == (ImageSpec.max_decode_pixels, ImageSpec.max_file_bytes)


@pytest.mark.parametrize("answers", ['yes: yes\n  no: no', 'yes: "yes"\n  no: "no"', "'yes': Yes\n  'no': NO"])
def test_yes_no_answers_stay_strings_quoted_or_not(tmp_path, answers):
    cfg = load(tmp_path, BASE.replace("task:\n", f"task:\n  {answers}\n"))
    assert cfg.task.yes.lower() == "yes" and cfg.task.no.lower() == "no"
    assert isinstance(cfg.task.yes, str) and isinstance(cfg.task.no, str)


@pytest.mark.parametrize("word", ["on", "off", "y", "n", "Yes", "OFF"])
def test_yaml11_boolean_words_stay_strings(tmp_path, word):
    cfg = load(tmp_path, BASE.replace('prompt: "Is there', f"yes: {word}\n  prompt: \"Is there"))
    assert cfg.task.yes == word


def test_true_false_are_still_booleans(tmp_path):
    assert "task.yes: expected a string (got true)" in error(tmp_path, BASE.replace("task:\n", "task:\n  yes: TRUE\n"))


def test_plain_safe_loader_is_untouched():
    import yaml
    assert yaml.safe_load("yes: on") == {True: True}


@pytest.mark.parametrize("text, msg", [
    (BASE.replace("  path: /models", "  pth: /models"), "model: unknown key 'pth' (did you mean 'path'?)"),
    (BASE + "run:\n  batch_tokenz: 1\n", "run: unknown key 'batch_tokenz'"),
    (BASE + "extra: 1\n", "config: unknown key 'extra'"),
])
def test_unknown_key_names_the_dotted_key(tmp_path, text, msg):
    assert error(tmp_path, text).startswith(msg)


@pytest.mark.parametrize("run, msg", [
    ("batch_tokens: 12", "run.batch_tokens: must be at least 256 (got 12)"),
    ("batch_tokens: '16384'", "run.batch_tokens: expected an integer (got '16384')"),
    ("batch_tokens: true", "run.batch_tokens: expected an integer (got true)"),
    ("rows_per_unit: 0", "run.rows_per_unit: must be at least 1 (got 0)"),
    ("workers: -1", "run.workers: must be 'auto' or an integer >= 0 (got -1)"),
    ("workers: many", "run.workers: must be 'auto' or an integer >= 0 (got 'many')"),
    ("claim_ttl_s: 0", "run.claim_ttl_s: must be greater than 0 (got 0)"),
    ("row_timeout_s: 0", "run.row_timeout_s: must be greater than 0 (got 0)"),
    ("row_timeout_s: null", "run.row_timeout_s: expected a number (got null)"),
])
def test_bad_run_values_name_the_key(tmp_path, run, msg):
    assert error(tmp_path, BASE + f"run:\n  {run}\n") == msg


@pytest.mark.parametrize("image, msg", [
    ("max_decode_pixels: 0", "image.max_decode_pixels: must be at least 1 (got 0)"),
    ("max_file_bytes: 64MB", "image.max_file_bytes: expected an integer (got '64MB')"),
])
def test_bad_image_caps_name_the_key(tmp_path, image, msg):
    assert error(tmp_path, BASE + f"image:\n  {image}\n") == msg


@pytest.mark.parametrize("edit, msg", [
    (("dtype", "  dtype: bf16\n"), "model.dtype: must be 'auto', 'bfloat16', 'float16' or 'float32' (got 'bf16')"),
    (("paths", "  paths: []\n"), "input.paths: must not be empty"),
    (("paths", "  paths: [a, 3]\n"), "input.paths[1]: expected a string (got 3)"),
    (("columns", "  columns: category\n"), "input.columns: expected a list (got 'category')"),
    (("columns", "  columns: [category, id]\n"), "input.columns: 'id' is the id column"),
    (("columns", "  columns: [category, image]\n"), "input.columns: 'image' is the image column"),
    (("columns", "  columns: [category, category]\n"), "input.columns: 'category' is listed twice"),
])
def test_bad_values_name_the_key(tmp_path, edit, msg):
    key, line = edit
    lines = BASE.splitlines(keepends=True)
    if key == "dtype":
        lines.insert(2, line)
    else:
        lines = [line if ln.strip().startswith(key + ":") else ln for ln in lines]
    assert error(tmp_path, "".join(lines)).startswith(msg)


def test_missing_section_and_key(tmp_path):
    assert error(tmp_path, BASE.replace("output:\n  path: out/run1\n", "")) == "output: missing required key"
    assert error(tmp_path, BASE.replace("  path: /models/Qwen3-VL-2B-Instruct\n", "  dtype: auto\n")) \
        == "model.path: missing required key"
    assert error(tmp_path, BASE.replace("  path: out/run1", "  path: 42")) == "output.path: expected a string (got 42)"
    assert error(tmp_path, BASE + "image: 5\n") == "image: expected a mapping of keys (got 5)"


@pytest.mark.parametrize("prompt, msg", [
    ("Is there a {categry}?", "task.prompt: {categry} is not a column; add it to input.columns (have: category)"),
    ("Is {} here?", "task.prompt: {} has no name"),
    ("Is {category.name} here?", "task.prompt: {category.name}: only plain column names"),
    ("Is {category here?", "task.prompt: expected '}' before end of string"),
    ("Is {category!x} here?", "task.prompt: does not format"),
    ("Is {category:{width}} here?", "task.prompt: {width} is not a column"),
])
def test_prompt_fields_must_be_columns_and_format(tmp_path, prompt, msg):
    assert error(tmp_path, BASE.replace("Is there a {category} in this image? Answer yes or no.", prompt)).startswith(msg)


def test_prompt_may_use_the_id_column_and_literal_braces(tmp_path):
    cfg = load(tmp_path, BASE.replace("Is there a {category}", "{{json}} {id}: is there a {category!r:>10}"))
    assert cfg.task.prompt.startswith("{{json}} {id}")


def test_answers_must_differ_and_not_be_empty(tmp_path):
    assert error(tmp_path, BASE.replace("task:\n", "task:\n  yes: sure\n  no: sure\n")) \
        == "task.no: must differ from yes (both 'sure')"
    assert error(tmp_path, BASE.replace("task:\n", "task:\n  yes: ''\n")) == "task.yes: must not be empty"


def test_image_limits_must_be_ordered(tmp_path):
    msg = error(tmp_path, BASE + "image:\n  min_pixels: 1000\n  max_pixels: 500\n")
    assert msg == "image.min_pixels: must not exceed image.max_pixels (got 1000 > 500)"
    assert load(tmp_path, BASE + "image:\n  max_pixels: 500\n").image.max_pixels == 500


def test_file_level_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config\.yaml: invalid YAML at line 3, column 1: expected ',' or ']'"):
        load(tmp_path, "model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: the top level must be a mapping.*got a list"):
        load(tmp_path, "- model\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: the file is empty"):
        load(tmp_path, "")
    with pytest.raises(ConfigError, match=r"config\.yaml: invalid YAML at line 3.*duplicate key 'path'"):
        load(tmp_path, BASE.replace("  path: /models/Qwen3-VL-2B-Instruct\n", "  path: a\n  path: b\n"))


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "jobs"
    sub.mkdir()
    (sub / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    text = BASE.replace("paths: [data/*.parquet]", "paths: [data/*.parquet, ../abs.parquet, s3://b/x/*.parquet]")
    cfg = load_config(write(sub, text.replace("/models/Qwen3-VL-2B-Instruct", "models/tiny")))
    assert cfg.input.paths == [str(sub / "data/*.parquet"), str(tmp_path / "abs.parquet"), "s3://b/x/*.parquet"]
    assert cfg.output.path == str(sub / "out/run1")
    assert cfg.model.path == str(sub / "models/tiny")
    hub = load_config(write(sub, text.replace("/models/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-2B-Instruct")))
    assert hub.model.path == "Qwen/Qwen3-VL-2B-Instruct"


def test_single_string_input_path(tmp_path):
    cfg = load(tmp_path, BASE.replace("paths: [data/*.parquet]", "paths: /abs/data.parquet"))
    assert cfg.input.paths == ["/abs/data.parquet"]


def test_config_from_dict_keeps_paths_without_base_dir():
    cfg = config_from_dict({"model": {"path": "m"}, "input": {"paths": "d.parquet", "image_column": None},
                            "task": {"prompt": "Is it {id}?"}, "output": {"path": "out"}})
    assert (cfg.input.paths, cfg.output.path, cfg.input.image_column) == (["d.parquet"], "out", None)


def test_fingerprint_tracks_results_not_run_settings(tmp_path):
    a = results_fingerprint(load(tmp_path, BASE))
    assert results_fingerprint(load(tmp_path, BASE + "run:\n  batch_tokens: 4096\n  workers: 3\n")) == a
    moved = BASE.replace("out/run1", "elsewhere").replace("data/*", "moved/*")
    assert results_fingerprint(load(tmp_path, moved)) == a
    b = results_fingerprint(load(tmp_path, BASE.replace("Answer yes or no.", "Reply yes or no.")))
    assert b != a
    assert [k for k in a if a[k] != b[k]] == ["task.prompt"]
    # the row timeout depends on the machine, not the results (the image caps are the resolved spec's: spec.py)
    assert results_fingerprint(load(tmp_path, BASE + "run:\n  row_timeout_s: 5\n")) == a


def test_fingerprint_is_flat_json():
    import json
    cfg = config_from_dict({"model": {"path": "m"}, "input": {"paths": ["d"]}, "task": {"prompt": "p"},
                            "output": {"path": "o"}})
    fp = results_fingerprint(cfg)
    assert json.loads(json.dumps(fp)) == fp
    assert all(isinstance(v, (str, int, list, type(None))) for v in fp.values())


def test_device_dtype_and_workers_derivation(tmp_path):
    cfg = load(tmp_path, BASE)
    assert resolved_device(cfg, True) == "cuda" and resolved_dtype(cfg, "cuda") == "bfloat16"
    assert resolved_device(cfg, False) == "cpu" and resolved_dtype(cfg, "cpu") == "float32"
    assert workers_count(cfg, 16) == 15 and workers_count(cfg, 1) == 1
    cuda = load(tmp_path, BASE.replace("  path: /models", "  device: cuda\n  dtype: float16\n  path: /models")
                + "run:\n  workers: 0\n")
    with pytest.raises(ConfigError, match="model.device: cuda was asked for"):
        resolved_device(cuda, False)
    with pytest.raises(ConfigError, match="model.dtype: float16 is not supported on cpu"):
        resolved_dtype(cuda, "cpu")
    assert resolved_dtype(cuda, "cuda") == "float16"
    assert workers_count(cuda, 16) == 0


def test_example_config_loads():
    cfg = load_config(EXAMPLE)
    assert cfg.model.path == "/models/Qwen3-VL-2B-Instruct"
    assert (cfg.task.yes, cfg.task.no) == ("yes", "no")
    assert "{category}" in cfg.task.prompt and "category" in cfg.input.columns
    assert cfg.input.paths[0].startswith("s3://")


def test_config_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, po_batch.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_output_inside_or_equal_to_an_input_directory_is_refused_naming_both(tmp_path):
    (tmp_path / "data").mkdir()
    for paths, out in [("[data]", "data/scores"), ("[data/*.parquet]", "data"), ("['data/**/*.parquet']", "data/x/y")]:
        with pytest.raises(ConfigError) as e:
            load(tmp_path, BASE.replace("[data/*.parquet]", paths).replace("out/run1", out))
        assert str(e.value).startswith(f"output.path: {tmp_path / out} is in the input directory {tmp_path / 'data'} "
                                       "(input.paths[0] is ")
        assert "write it elsewhere" in str(e.value)
    load(tmp_path, BASE.replace("out/run1", "scores"))  # beside the input: fine
    load(tmp_path, BASE.replace("[data/*.parquet]", "[data/a.parquet]").replace("out/run1", "data"))  # a file
    load(tmp_path, BASE.replace("[data/*.parquet]", "['s3://bucket/data/*.parquet']").replace("out/run1", "data"))
