"""Prompt prep: render the checkpoint's chat template once, tokenize its fixed parts once, and per row tokenize
only the row's text, expand the image placeholder to the image's token count and lay out the positions: the text's
counting up, the image's where its family's processor puts them (prep/families.py)."""

import json
from dataclasses import dataclass, replace

import numpy as np
from tokenizers import Tokenizer

from po_batch.prep.families import TEXT, FamilyPrep
from po_batch.sample import NO_TARGET, Picture, Question

SENTINEL = "\x00po-batch-prompt\x00"


class PromptError(Exception):
    """A prompt or answer that cannot work with this tokenizer, explained in one sentence."""


@dataclass
class PromptTemplate:
    """Picklable: sent once to each prep worker, which needs only the `tokenizers` library."""
    tokenizer: object        # tokenizers.Tokenizer for the rows' text: special tokens in it are text, never control
    prefix: list[int]        # chat template up to the user's text (holding one image placeholder for VL models)
    suffix: list[int]        # from the end of the user's text to the assistant's turn
    after: str               # the suffix as text (labels are tokenized in this context)
    image_token_id: int | None
    axes: int                # rows of the positions of a prompt without an image (FamilyPrep.axes)
    trim: bool = False       # the chat template strips the user's text (Gemma's `| trim`): so does po-batch
    # A tokenizer whose pieces depend on where they stand (Llama/Mistral's Metaspace, which prepends "▁" to the
    # first piece only) tokenizes each row's text with the template's text around it up to the nearest special
    # tokens: `tail` (of the prefix) + text + `head` (of the suffix), as one piece, like the whole prompt.
    stretch: bool = False
    tail: str = ""
    head: str = ""

    @property
    def fixed(self) -> list:
        """What the fingerprint takes of the template."""
        return [self.prefix, self.suffix] + ([self.tail, self.head] if self.stretch else [])

    def encode(self, questions: list[Question], fields: dict, picture: Picture | None = None):
        """One row as a Sample's token fields: (ids (L,), positions (axes, L), segments (S, 3), targets (R,)).
        The prefix is shared by the questions; with a single question it is one segment with it."""
        head = self.prefix
        if picture is not None:
            at = self.prefix.index(self.image_token_id)
            head = self.prefix[:at] + [self.image_token_id] * picture.tokens + self.prefix[at + 1:]
            head_pos = image_positions(len(head), at, picture)
        else:
            head_pos = np.broadcast_to(np.arange(len(head), dtype=np.int32), (self.axes, len(head)))
        values = {k: "" if v is None else v for k, v in fields.items()}  # a null renders as empty text
        segs = [(head, head_pos, -1, [])]  # (ids, positions, parent, targets of the rows read: the last ones)
        for q in questions:
            rendered = q.text.format_map(values)
            text = self.tokenizer.encode(self.tail + (rendered.strip() if self.trim else rendered) + self.head,
                                         add_special_tokens=False).ids
            at = len(segs)
            segs.append(_child(segs, 0, text + self.suffix, [NO_TARGET]))
            segs += [_child(segs, at, list(fed), list(tgt)) for fed, tgt in q.branches]
        if len(questions) == 1:  # nothing shares the prefix: one sequence, as a plain forward runs it
            (ids, pos, _, _), (q_ids, q_pos, _, q_targets) = segs[:2]
            segs = [(ids + q_ids, np.concatenate([pos, q_pos], 1), -1, q_targets)] + [
                (i, p, parent - 1, t) for i, p, parent, t in segs[2:]]
        return (np.array([t for s in segs for t in s[0]], dtype=np.int32), np.concatenate([s[1] for s in segs], 1),
                np.array([(len(s[0]), s[2], len(s[3])) for s in segs], dtype=np.int32).reshape(-1, 3),
                np.array([t for s in segs for t in s[3]], dtype=np.int32))


def _child(segs: list, parent: int, ids: list[int], targets: list[int]) -> tuple:
    """A segment under `parent`: its positions continue from the parent's highest (the tree's text runs on)."""
    pos = segs[parent][1]
    start = int(pos.max()) + 1 if pos.size else 0
    return ids, np.broadcast_to(np.arange(start, start + len(ids), dtype=np.int32), (len(pos), len(ids))), parent, \
        targets


def image_positions(length: int, at: int, picture: Picture) -> np.ndarray:
    """(axes, length) positions of a prompt whose image's tokens start at `at`: the text before counts up, the
    image's tokens take at + their offsets, the text after resumes at + advance (Qwen-VL: (t, h, w) = (0, row, col)
    and max(rows, cols); LLaVA-NeXT: one axis counting on)."""
    n = picture.tokens
    pos = np.empty((len(picture.offsets), length), dtype=np.int32)
    pos[:, :at] = np.arange(at, dtype=np.int32)
    pos[:, at:at + n] = at + picture.offsets
    pos[:, at + n:] = at + picture.advance + np.arange(length - at - n, dtype=np.int32)
    return pos


def render_chat(tokenizer, content, system: str | None = None) -> str:
    """The chat template around one user turn (and a system message), up to the assistant's turn, with thinking
    off (Qwen3's templates then render an empty think block; templates without the switch ignore it)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def build_template(tokenizer, image: bool, image_token_id: int | None, family: FamilyPrep = TEXT,
                   system: str | None = None, raw: bool = False) -> PromptTemplate:
    """`tokenizer` is the checkpoint's transformers tokenizer, with its chat template. `raw`: no chat template,
    the user's text with the special tokens the tokenizer itself adds (an image first, on a vision model, as
    `family.placeholder`). A vision family's chat-templated prompt is tokenized as transformers' processors do
    (ProcessorMixin.apply_chat_template): with the tokenizer's own special tokens unless it begins with BOS (the
    LLaVA-NeXT Mistral template writes none and its tokenizer adds it); a text model's as its tokenizer's
    apply_chat_template does, without."""
    backend = tokenizer.backend_tokenizer
    enc = lambda s: backend.encode(s, add_special_tokens=False).ids  # noqa: E731
    probe = "Probe text, with  spaces."
    if raw:
        lead, trail = added_tokens(backend, probe, "template: raw")
        prefix = lead + (enc(family.placeholder) if image else [])
        after = backend.decode(trail, skip_special_tokens=False)
        # after the image's placeholder (a special token) the text is not the prompt's first piece
        return PromptTemplate(text_tokenizer(backend, first_piece=not image), prefix, trail, after,
                              image_token_id if image else None, family.axes)

    def render(text: str) -> str:
        return render_chat(tokenizer, [{"type": "image"}, {"type": "text", "text": text}] if image else text, system)

    if tokenizer.chat_template is None:
        raise PromptError("the checkpoint has no chat template (chat_template.jinja or tokenizer_config.json); "
                          "use task.template: raw")
    rendered = render(SENTINEL)
    if rendered.count(SENTINEL) != 1:
        raise PromptError("the chat template does not place the user's text exactly once")
    before, after = rendered.split(SENTINEL)
    if render(probe) != before + probe + after:
        raise PromptError("the chat template rewrites the user's text; po-batch cannot reuse its rendering")
    padded = f"  {probe}\n"
    trim = render(padded) == before + probe + after
    if not trim and render(padded) != before + padded + after:
        raise PromptError("the chat template rewrites the whitespace around the user's text; po-batch cannot "
                          "reuse its rendering")
    prefix, suffix = enc(before), enc(after)
    special = family.processor is not None and not (tokenizer.bos_token and before.startswith(tokenizer.bos_token))
    lead: list[int] = []  # the tokens the tokenizer itself puts before the prompt (a BOS), when it is asked to
    if special:
        lead, trail = added_tokens(backend, probe, "a vision model's chat template")
        if trail:
            raise PromptError("the tokenizer adds tokens after the text (an EOS), which would follow the assistant's "
                              "header; po-batch cannot score such a prompt")
        prefix = lead + prefix
    if image and prefix.count(image_token_id) != 1:
        raise PromptError(f"the chat template renders {prefix.count(image_token_id)} image placeholders "
                          f"(token id {image_token_id}); expected exactly one")
    # without `special`, the rendered template holds every token the model wants: a tokenizer that adds its own
    # (Gemma's BOS) must not add them again, as apply_chat_template does not
    whole = lambda text: tokenizer(before + text + after, add_special_tokens=special).input_ids  # noqa: E731
    template = PromptTemplate(text_tokenizer(backend), prefix, suffix, after, image_token_id if image else None,
                              family.axes, trim)
    if whole(probe) != prefix + enc(probe) + suffix:
        template = _in_stretch(template, backend, lead, before, after)
        row = lambda text: template.tokenizer.encode(template.tail + text + template.head,  # noqa: E731
                                                     add_special_tokens=False).ids
        if any(whole(p) != template.prefix + row(p) + template.suffix for p in (probe, padded)):
            raise PromptError("tokenizing the prompt's parts separately differs from tokenizing it whole")
    return template


def _in_stretch(template: PromptTemplate, backend, lead: list[int], before: str, after: str) -> PromptTemplate:
    """The template for a tokenizer whose pieces depend on their place: the prefix ends at the last special token
    before the user's text, the suffix starts at the first one after it, and the text between is tokenized with
    each row's text as one piece. That piece never starts the prompt when a special token precedes it, so a
    Metaspace that prepends "▁" to the first piece only must not prepend it there."""
    specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
    past_last = lambda s: max((s.rfind(t) + len(t) for t in specials if t in s), default=0)  # noqa: E731
    cut_b = past_last(before)
    cut_a = min((after.find(t) for t in specials if t in after), default=len(after))
    enc = lambda s: backend.encode(s, add_special_tokens=False).ids  # noqa: E731
    tok = text_tokenizer(backend, first_piece=not (lead or cut_b))
    rest = after[cut_a:]
    # a label follows the prompt's last piece: the suffix's text after its last special token, or `head`
    return replace(template, stretch=True, tokenizer=tok, prefix=lead + enc(before[:cut_b]), suffix=enc(rest),
                   after=rest[past_last(rest):] if rest else after[:cut_a], tail=before[cut_b:], head=after[:cut_a])


def added_tokens(backend, probe: str, where: str) -> tuple[list[int], list[int]]:
    """The tokens the tokenizer itself adds before and after any text (a BOS, an EOS)."""
    whole, body = backend.encode(probe).ids, backend.encode(probe, add_special_tokens=False).ids
    at = next((i for i in range(len(whole) - len(body) + 1) if whole[i:i + len(body)] == body), None)
    if at is None:
        raise PromptError(f"the tokenizer's own special tokens change the user's text's tokens ({where})")
    return whole[:at], whole[at + len(body):]


def text_tokenizer(backend, first_piece: bool = True) -> Tokenizer:
    """A copy of the checkpoint's tokenizers.Tokenizer for the rows' text, where special tokens are text: a row's
    "<|image_pad|>" is seven characters, not an image slot. Without `first_piece`, the text stands after other
    pieces of the prompt: a Metaspace pre-tokenizer that prepends "▁" to the first piece only prepends nothing."""
    doc = json.loads(backend.to_str())
    if not first_piece:
        pre = doc.get("pre_tokenizer") or {}
        for p in pre.get("pretokenizers", [pre]):
            if p.get("type") == "Metaspace" and p.get("prepend_scheme") == "first":
                p["prepend_scheme"] = "never"
    text = Tokenizer.from_str(json.dumps(doc))
    text.encode_special_tokens = True
    return text


def in_context(template: PromptTemplate, backend, word: str) -> list[int]:
    """The tokens of `word` where an answer stands: right after the assistant's header, as the template renders
    it (a word can tokenize differently alone). `backend` is the checkpoint's tokenizers.Tokenizer."""
    if template.stretch:  # `after` is the prompt's last piece: the word joins it (layout in _in_stretch)
        tok = text_tokenizer(backend, first_piece=False) if template.suffix else template.tokenizer
        ids = tok.encode(template.after + word, add_special_tokens=False).ids
        base = tok.encode(template.after, add_special_tokens=False).ids
    else:
        ids, base = backend.encode(template.after + word, add_special_tokens=False).ids, template.suffix
    if ids[:len(base)] != base:
        raise PromptError(f"{word!r} merges with the end of the chat template's assistant header when tokenized")
    return ids[len(base):]


def answer_ids(tokenizer, answers: dict[str, str]) -> list[int]:
    """One token id per answer word; `answers` maps the config key (task.yes) to the word."""
    ids = []
    for key, word in answers.items():
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) != 1:
            pieces = ", ".join(repr(tokenizer.decode([t])) for t in toks)
            raise PromptError(f"{key}: {word!r} is {len(toks)} tokens for this tokenizer ({pieces}); "
                              f"an answer must be exactly one token")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise PromptError(f"{', '.join(answers)}: two answers are the same token")
    return ids
