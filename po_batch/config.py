"""The schema of config.yaml: loading (YAML 1.2 booleans, safe loader), validation with errors that
name the key, path resolution, the results fingerprint and the derived device/dtype/worker values."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from string import Formatter
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator,
                      model_validator)

NonEmptyStr = Annotated[str, Field(min_length=1)]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["auto", "cuda", "cpu"]


class ConfigError(Exception):
    """A user-facing config problem; str() is one line that starts with the key (or the file)."""


class _FieldError(ValueError):
    """Raised inside validators to point at `key`, dotted and relative to the model that raises it."""

    def __init__(self, key: str, msg: str):
        super().__init__(msg)
        self.key = key
        self.msg = msg


# --- YAML ---------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans, so `yes: yes` stays strings.
    Duplicate keys are an error instead of the last one silently winning."""

    yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|false)$", re.IGNORECASE), list("tTfF"))


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"(model, input, task, ...), got a {type(data).__name__}")
    return data


# --- paths ---------------------------------------------------------------------------------------

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _local(path: str, base: Path | None) -> str:
    """Resolve a local path (or glob) against the config file's folder; URLs stay as they are."""
    if _URL.match(path):
        return path
    p = Path(path).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return os.path.normpath(p)


def _base(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("base_dir")


# --- schema --------------------------------------------------------------------------------------

class _Section(BaseModel):
    # strict: YAML already gives typed values; don't turn `true` into 1 or "12" into 12
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelConfig(_Section):
    path: NonEmptyStr
    dtype: Dtype = "auto"
    device: Device = "auto"
    quantization: Literal["none", "fp8"] = "none"  # fp8: e4m3 linear layers (Hopper/Ada GPUs), see layers/fp8.py

    @field_validator("path")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        # A relative path could also be a hub id ("Qwen/Qwen3-VL-2B-Instruct"): it is a local dir
        # only when written as one ("./", "../", "~") or when that dir exists beside the config.
        base = _base(info)
        if base is None or _URL.match(v) or Path(v).is_absolute():
            return v
        if v.startswith(("./", "../", "~")) or (base / v).is_dir():
            return _local(v, base)
        return v


WDS_KEY = "__key__"  # a WebDataset sample's id, as webdataset names it
_SHARD = (".tar", ".tar.gz", ".tgz")


class InputConfig(_Section):
    paths: Annotated[list[NonEmptyStr], Field(min_length=1)]
    # null: by the paths' extensions (.tar shards are webdataset, anything else parquet)
    format: Literal["parquet", "webdataset"] | None = None
    id_column: NonEmptyStr | None = None  # null: "id" for parquet, and a WebDataset's id is always __key__
    image_column: NonEmptyStr | None = "image"  # webdataset: any name means "read the image member", null none
    columns: list[NonEmptyStr] = []
    # webdataset only: the member extensions that hold the image; skip img2dataset's failed downloads instead of
    # writing them as error rows
    image_extensions: Annotated[list[NonEmptyStr], Field(min_length=1)] = ["jpg", "jpeg", "png", "webp"]
    skip_failed: bool = False

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("paths")
    @classmethod
    def _resolve(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return [_local(p, _base(info)) for p in v]

    @field_validator("image_extensions")
    @classmethod
    def _extensions(cls, v: list[str]) -> list[str]:
        return [e.removeprefix(".").lower() for e in v]

    @model_validator(mode="after")
    def _format(self) -> InputConfig:
        if self.format is None:
            shards = [p.lower().rstrip("/").endswith(_SHARD) for p in self.paths]
            if any(shards) and not all(shards):
                raise _FieldError("paths", "mixes .tar shards and other inputs; one format per run (set "
                                           "input.format to read them all as one)")
            self.format = "webdataset" if all(shards) else "parquet"
        if self.format == "webdataset":
            if self.id_column not in (None, WDS_KEY):
                raise _FieldError("id_column", f"a WebDataset sample's id is its {WDS_KEY}; leave id_column out")
            self.id_column = WDS_KEY
        else:
            for key in sorted({"image_extensions", "skip_failed"} & self.model_fields_set):
                raise _FieldError(key, "applies to webdataset inputs only")
            self.id_column = self.id_column or "id"
        return self

    @model_validator(mode="after")
    def _check(self) -> InputConfig:
        seen = set()
        for c in self.columns:
            if c in seen:
                raise _FieldError("columns", f"{c!r} is listed twice")
            seen.add(c)
        if self.id_column in seen:
            raise _FieldError("columns", f"{self.id_column!r} is the id column (input.id_column); "
                                         "it is copied to the output already")
        if self.image_column is not None:
            if self.image_column == self.id_column:
                raise _FieldError("image_column", f"{self.image_column!r} is also the id column")
            if self.image_column in seen:
                raise _FieldError("columns", f"{self.image_column!r} is the image column "
                                             "(input.image_column); it cannot be a passthrough column")
        return self


class _Prompted(_Section):
    """How the prompt around the row's text is rendered, for every task: the checkpoint's chat template (with
    `system` as its system message, thinking off for Qwen3's templates) or `raw`, the text alone with only the
    special tokens the tokenizer itself adds (Qwen3-Embedding's appends its end-of-text token)."""
    system: NonEmptyStr | None = None
    template: Literal["chat", "raw"] = "chat"

    @model_validator(mode="after")
    def _check_system(self) -> _Prompted:
        if self.system is not None and self.template == "raw":
            raise _FieldError("system", "a raw prompt has no system message; use template: chat or drop system")
        return self


PROMPT_OPTIONS = {name: f.default for name, f in _Prompted.model_fields.items()}


class YesNoTask(_Prompted):
    """One question answered by the logits of two answer tokens at the last position."""
    kind: ClassVar[str] = "yes_no"
    type: Literal["yes_no"] = "yes_no"
    prompt: NonEmptyStr
    yes: NonEmptyStr = "yes"
    no: NonEmptyStr = "no"

    @model_validator(mode="after")
    def _check(self) -> YesNoTask:
        if self.yes == self.no:
            raise _FieldError("no", f"must differ from yes (both {self.yes!r})")
        return self


class LabelsTask(_Prompted):
    """One question answered by the best of several labels: first-token logits, or summed label log-probs."""
    kind: ClassVar[str] = "labels"
    type: Literal["labels"]
    prompt: NonEmptyStr
    labels: Annotated[list[NonEmptyStr], Field(min_length=2)]
    label_scoring: Literal["first_token", "full"] = "first_token"

    @model_validator(mode="after")
    def _check(self) -> LabelsTask:
        seen = set()
        for label in self.labels:
            if label in seen:
                raise _FieldError("labels", f"{label!r} is listed twice")
            seen.add(label)
        return self


def _task_kind(v: Any) -> str | None:
    """The union's tag: `questions` when the section holds questions, else its `type` (yes_no by default)."""
    if isinstance(v, dict):
        return "questions" if "questions" in v else v.get("type", "yes_no")
    return v.kind if isinstance(v, _Section) else None


_QUESTION_TYPES = {"yes_no": YesNoTask, "labels": LabelsTask}
QuestionConfig = Annotated[Union[tuple(Annotated[cls, Tag(tag)] for tag, cls in _QUESTION_TYPES.items())],
                           Discriminator(_task_kind)]
QUESTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class QuestionsTask(_Prompted):
    """Several questions about each row's image; each question's columns are prefixed by its name."""
    kind: ClassVar[str] = "questions"
    questions: Annotated[dict[str, QuestionConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _check(self) -> QuestionsTask:
        for name, q in self.questions.items():
            if not QUESTION_NAME.match(name):
                raise _FieldError("questions", f"{name!r} is not a valid question name (letters, digits and _, "
                                               "not starting with a digit): it prefixes output column names")
            options = sorted(q.model_fields_set & set(PROMPT_OPTIONS))
            if options:
                raise _FieldError(f"questions.{name}.{options[0]}", "set it on task itself: the questions share "
                                                                    "one prompt prefix")
        return self


class EmbedTask(_Prompted):
    """A pooled last-layer hidden state per row: the last row, the mean over all rows, or the mean over the
    image's span (vision start to vision end, as jina-embeddings-v4 pools images)."""
    kind: ClassVar[str] = "embed"
    type: Literal["embed"]
    prompt: str = ""
    pooling: Literal["last", "mean", "span"] = "last"
    normalize: bool = True
    dim: Annotated[int, Field(ge=1)] | None = None  # Matryoshka: keep the first `dim` values (then re-normalize)
    output_dtype: Literal["float16", "float32"] = "float32"


class RerankTask(_Section):
    """The relevance of each row's document (its text, or its image on a vision model) to the row's query, scored
    as the checkpoint's model card does (the recipe)."""
    kind: ClassVar[str] = "rerank"
    type: Literal["rerank"]
    recipe: Literal["auto", "qwen3", "jina_m0", "jina_v3", "bge_gemma"] = "auto"
    query: NonEmptyStr
    document: str = ""
    instruction: NonEmptyStr | None = None  # null: the recipe's default
    block: Annotated[int, Field(ge=1, le=125)] = 125  # jina_v3: documents of one query per prompt


TASK_TYPES = {**_QUESTION_TYPES, "questions": QuestionsTask, "embed": EmbedTask, "rerank": RerankTask}
TaskConfig = Annotated[Union[tuple(Annotated[cls, Tag(tag)] for tag, cls in TASK_TYPES.items())],
                       Discriminator(_task_kind)]


def named_questions(task) -> dict:
    """The task's questions by name; a single task is one question named "" (its columns take no prefix)."""
    return dict(task.questions) if isinstance(task, QuestionsTask) else {"": task}


class ImageConfig(_Section):
    min_pixels: Annotated[int, Field(ge=1)] | None = None
    max_pixels: Annotated[int, Field(ge=1)] | None = None
    # A source image over this many pixels is decoded at 1/2, 1/4 or 1/8 scale if it is a JPEG (such rows differ
    # from transformers' processor, which decodes full size), else it is a row error `bomb`. 40 MP keeps a prep
    # worker under ~0.5 GB; PIL itself refuses any image over 179 MP, whatever this says.
    max_decode_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    # An image file (or Parquet value) over this many bytes is a row error `too_large`, and is never read whole.
    max_file_bytes: Annotated[int, Field(ge=1)] = 64 << 20

    @model_validator(mode="after")
    def _check(self) -> ImageConfig:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise _FieldError("min_pixels", f"must not exceed image.max_pixels "
                                            f"(got {self.min_pixels} > {self.max_pixels})")
        return self


class OutputConfig(_Section):
    path: NonEmptyStr

    @field_validator("path")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        return _local(v, _base(info))


class RunConfig(_Section):
    batch_tokens: Annotated[int, Field(ge=256)] = 16384
    # engine processes, one per GPU (CUDA_VISIBLE_DEVICES each, no NCCL): auto = every visible GPU, 1 on the CPU;
    # N CPU engine processes with model.device: cpu
    gpus: int | Literal["auto"] = "auto"
    workers: int | Literal["auto"] = "auto"  # prep processes per engine process; 0 = prep in the engine process
    rows_per_unit: Annotated[int, Field(ge=1)] = 4096
    claim_ttl_s: Annotated[float, Field(gt=0)] = 300
    log_every_s: Annotated[float, Field(gt=0)] = 30
    # A row whose prep takes longer is a row error `timeout` and its worker is killed and replaced (a hung network
    # read, a pathological image). With workers: 0, prep runs in the main process and no timeout applies.
    row_timeout_s: Annotated[float, Field(gt=0)] = 60

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (type(v) is int and v >= 0):
            return v
        raise ValueError(f"must be 'auto' or an integer >= 0 (got {_show(v)})")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        return parse_gpus(v)


def parse_gpus(v: Any) -> int | str:
    """run.gpus or --gpus: 'auto' or a count of at least 1 (a digit string from the command line too)."""
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if v == "auto" or (type(v) is int and v >= 1):
        return v
    raise ValueError(f"must be 'auto' or an integer >= 1 (got {_show(v)})")


class Config(_Section):
    model: ModelConfig
    input: InputConfig
    task: TaskConfig
    image: ImageConfig = Field(default_factory=ImageConfig)
    output: OutputConfig
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check_prompts(self) -> Config:
        allowed = [self.input.id_column, *self.input.columns]
        for name, q in named_questions(self.task).items():
            key = f"task.questions.{name}" if name else "task"
            for field in ("prompt", "query", "document"):
                if hasattr(q, field):
                    _check_prompt(getattr(q, field), f"{key}.{field}", allowed, self.input.columns)
        return self

    @model_validator(mode="after")
    def _check_output(self) -> Config:
        if _URL.match(self.output.path) and not self.output.path.startswith("file://"):
            return self
        out = os.path.realpath(self.output.path.removeprefix("file://"))
        for i, p in enumerate(self.input.paths):
            folder = _input_dir(p)
            if folder is not None and (out == folder or out.startswith(folder.rstrip(os.sep) + os.sep)):
                raise _FieldError("output.path", f"{self.output.path} is in the input directory {folder} "
                                                 f"(input.paths[{i}] is {p}); po-batch would read its own output "
                                                 "as input: write it elsewhere")
        return self


def _check_prompt(prompt: str, key: str, allowed: list[str], columns: list[str]) -> None:
    have = ", ".join(columns) or "none"
    try:
        fields = [f for _, f, _, _ in Formatter().parse(prompt) if f is not None]
    except ValueError as e:
        raise _FieldError(key, f"{e}; write {{{{ or }}}} for a literal brace") from None
    for f in fields:
        if f == "" or f.isdigit():
            raise _FieldError(key, f"{{{f}}} has no name; write a column name, e.g. {{category}}")
        if f not in allowed and re.search(r"[.\[]", f):
            raise _FieldError(key, f"{{{f}}}: only plain column names are allowed in braces")
        if f not in allowed:
            raise _FieldError(key, f"{{{f}}} is not a column; add it to input.columns (have: {have})")
    try:
        prompt.format_map({c: _Blank() for c in allowed})
    except KeyError as e:  # a field nested in a format spec, e.g. {category:{width}}
        raise _FieldError(key, f"{{{e.args[0]}}} is not a column; add it to input.columns (have: {have})") from None
    except (ValueError, IndexError) as e:
        raise _FieldError(key, f"does not format: {e}") from None


def _input_dir(path: str) -> str | None:
    """The folder an input path lists files from: the directory itself, or the one a glob starts in; None for a
    file or a remote URL."""
    if _URL.match(path) and not path.startswith("file://"):
        return None
    path = path.removeprefix("file://")
    parts = path.split(os.sep)
    for k, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return os.path.realpath(os.sep.join(parts[:k]) or os.sep)
    return os.path.realpath(path) if os.path.isdir(path) else None


class _Blank:
    """Stands in for a row value when checking that the prompt formats; accepts any format spec."""

    def __format__(self, spec: str) -> str:
        return ""


# --- loading and errors ----------------------------------------------------------------------------

_TYPE_NAMES = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number",
    "bool_type": "true or false", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
}


def _show(v: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _untag(loc: tuple) -> tuple[tuple, list[type[BaseModel]]]:
    """pydantic puts a tagged union's tag into the error's location (task.labels.prompt for task.prompt): drop
    it, and return beside the clean location the model class of each of its parts, for key suggestions."""
    clean, models, model = [], [], Config
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        clean.append(part)
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            model = None
        elif part == "task":
            model = TASK_TYPES.get(parts.pop(0)) if parts else None
        elif part == "questions" and model is QuestionsTask:
            if parts:
                clean.append(parts.pop(0))  # the question's name
            model = _QUESTION_TYPES.get(parts.pop(0)) if parts else None
        else:
            ann = field.annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        models.append(model)
    return tuple(clean), models


def _message(err: dict) -> str:
    """One pydantic error as `dotted.key: short message (got value)`."""
    (loc, models), kind, ctx = _untag(tuple(err["loc"])), err["type"], err.get("ctx", {})
    got = f" (got {_show(err['input'])})"
    if kind == "value_error":
        e = ctx["error"]
        if isinstance(e, _FieldError):
            loc, msg = loc + tuple(e.key.split(".")), e.msg
        else:
            msg = str(e)
    elif kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        owner = models[-2] if len(models) > 1 else Config
        fields = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
        return f"{_dotted(parent) or 'config'}: unknown key {key!r}{hint}"
    elif kind == "missing":
        msg = "missing required key"
    elif kind == "greater_than_equal":
        msg = f"must be at least {_show(ctx['ge'])}{got}"
    elif kind == "greater_than":
        msg = f"must be greater than {_show(ctx['gt'])}{got}"
    elif kind in ("too_short", "string_too_short"):
        msg = "must not be empty"
    elif kind == "literal_error":
        msg = f"must be {ctx['expected']}{got}"
    elif kind == "union_tag_invalid":  # an unknown task.type
        if "questions" in loc:
            msg = f"must be {' or '.join(map(repr, _QUESTION_TYPES))} (got {ctx['tag']!r})"
        else:
            msg = (f"must be {', '.join(repr(t) for t in TASK_TYPES if t != 'questions')}, or the task a mapping "
                   f"of questions (got {ctx['tag']!r})")
        loc = loc + ("type",)
    elif kind == "union_tag_not_found":
        msg = f"expected {_TYPE_NAMES['dict_type']}{got}"
    elif kind in _TYPE_NAMES:
        msg = f"expected {_TYPE_NAMES[kind]}{got}"
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:] + got
    return f"{_dotted(loc) or 'config'}: {msg}"


def config_from_dict(data: dict, base_dir: str | Path | None = None) -> Config:
    """Validate an already-parsed config; relative local paths resolve against `base_dir` if given."""
    context = {"base_dir": Path(base_dir).resolve()} if base_dir is not None else None
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as e:
        # an unknown key is usually a typo that also causes a "missing" error: report it first
        errs = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise ConfigError(_message(errs[0])) from None


def config_to_dict(cfg: Config) -> dict:
    """The validated config as JSON that config_from_dict takes back unchanged (what a launcher hands its engine
    processes): only the keys the user set, since a default written out reads as set (a question's `system`)."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def load_config(path: str | Path) -> Config:
    """Read and validate config.yaml; relative local paths resolve against the file's folder."""
    path = Path(path)
    return config_from_dict(_read_yaml(path), base_dir=path.resolve().parent)


# --- derived values ------------------------------------------------------------------------------

def resolved_device(cfg: Config, cuda_available: bool) -> str:
    if cfg.model.device == "auto":
        return "cuda" if cuda_available else "cpu"
    if cfg.model.device == "cuda" and not cuda_available:
        raise ConfigError("model.device: cuda was asked for but no CUDA device is available "
                          "(use auto or cpu)")
    return cfg.model.device


def resolved_dtype(cfg: Config, device: str) -> str:
    """The torch dtype name to run in on `device` (as returned by resolved_device)."""
    if cfg.model.dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    if cfg.model.dtype == "float16" and device == "cpu":
        raise ConfigError("model.dtype: float16 is not supported on cpu (use bfloat16 or float32)")
    return cfg.model.dtype


def workers_count(cfg: Config, cpu_count: int) -> int:
    """Prep processes to start for one engine process that may use `cpu_count` cores (its share of the node's):
    0 means prep runs in the engine process."""
    if cfg.run.workers == "auto":
        return max(1, cpu_count - 1)
    return cfg.run.workers


def engines_count(cfg: Config, device: str, visible_gpus: int, gpus: int | str | None = None) -> int:
    """Engine processes to start on this node: one per GPU on CUDA, as many as asked on the CPU (auto: one).
    `gpus` overrides run.gpus (the --gpus option); `device` is resolved_device's."""
    gpus = cfg.run.gpus if gpus is None else gpus
    if device == "cpu":
        if gpus != "auto" and cfg.model.device != "cpu":
            raise ConfigError(f"run.gpus: {gpus} asked for, but no CUDA device is available (set model.device: cpu "
                              f"to run {gpus} CPU engine processes)")
        return 1 if gpus == "auto" else gpus
    if gpus == "auto":
        return visible_gpus
    if gpus > visible_gpus:
        raise ConfigError(f"run.gpus: {gpus} asked for, but {visible_gpus} GPU{'s are' if visible_gpus > 1 else ' is'} "
                          f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return gpus


# --- fingerprint ---------------------------------------------------------------------------------

def results_fingerprint(cfg: Config) -> dict:
    """The config's part of the fingerprint (everything in it that changes results), as flat dotted keys with
    JSON values. Paths, batch size, workers and device are left out: a resume may move the data or run on another
    node. The resolved spec adds what the checkpoint decides (spec.py)."""
    inp = cfg.input
    # WebDataset's keys are listed only for it: outputs of Parquet planned before they existed resume
    wds = {"input.format": inp.format, "input.image_extensions": list(inp.image_extensions),
           "input.skip_failed": inp.skip_failed} if inp.format == "webdataset" else {}
    return {"model.quantization": cfg.model.quantization,
            **_flat(_without_default_options(cfg.task.model_dump()), "task."),
            "input.id_column": inp.id_column,
            "input.image_column": inp.image_column,
            "input.columns": list(inp.columns), **wds}


def _without_default_options(d: dict) -> dict:
    """Prompt options left at their defaults are not listed: outputs planned before the options existed resume."""
    return {k: _without_default_options(v) if isinstance(v, dict) else v for k, v in d.items()
            if not (k in PROMPT_OPTIONS and v == PROMPT_OPTIONS[k])}


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
