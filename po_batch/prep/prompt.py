"""Prompt prep: render the checkpoint's chat template once, tokenize its fixed parts once, and per row tokenize
only the row's text, expand the image placeholder to the image's token count and compute M-RoPE positions."""

from dataclasses import dataclass

import numpy as np

SENTINEL = "\x00po-batch-prompt\x00"


class PromptError(Exception):
    """A prompt or answer that cannot work with this tokenizer, explained in one sentence."""


@dataclass
class PromptTemplate:
    """Picklable: sent once to each prep worker, which needs only the `tokenizers` library."""
    tokenizer: object        # tokenizers.Tokenizer
    prefix: list[int]        # chat template up to the user's text (holding one image placeholder for VL models)
    suffix: list[int]        # from the end of the user's text to the assistant's turn
    text: str                # task.prompt, with {column} fields
    image_token_id: int | None
    merge: int = 2

    def encode(self, fields: dict, grid: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32, L) and positions (int32, 3 x L) for one row."""
        text = self.tokenizer.encode(self.text.format(**fields), add_special_tokens=False).ids
        if grid is None:
            ids = np.array(self.prefix + text + self.suffix, dtype=np.int32)
            return ids, np.broadcast_to(np.arange(len(ids), dtype=np.int32), (3, len(ids))).copy()
        at = self.prefix.index(self.image_token_id)
        gh, gw = grid[1] // self.merge, grid[2] // self.merge
        n = gh * gw
        ids = np.array(self.prefix[:at] + [self.image_token_id] * n + self.prefix[at + 1:] + text + self.suffix,
                       dtype=np.int32)
        return ids, mrope_positions(len(ids), at, gh, gw)


def mrope_positions(length: int, start: int, gh: int, gw: int) -> np.ndarray:
    """Text before the image counts up; the image's tokens take (t, h, w) = start + (0, row, col); text after
    resumes at start + max(gh, gw), as in Qwen2/2.5/3-VL for a still image."""
    pos = np.empty((3, length), dtype=np.int32)
    pos[:, :start] = np.arange(start, dtype=np.int32)
    n = gh * gw
    rows, cols = np.divmod(np.arange(n, dtype=np.int32), gw)
    pos[0, start:start + n] = start
    pos[1, start:start + n] = start + rows
    pos[2, start:start + n] = start + cols
    tail = length - start - n
    pos[:, start + n:] = start + max(gh, gw) + np.arange(tail, dtype=np.int32)
    return pos


def build_template(tokenizer, prompt: str, image: bool, image_token_id: int | None, merge: int = 2) -> PromptTemplate:
    """`tokenizer` is the checkpoint's transformers tokenizer, with its chat template."""
    def render(text: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": text}] if image else text
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    if tokenizer.chat_template is None:
        raise PromptError("the checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)")
    rendered = render(SENTINEL)
    if rendered.count(SENTINEL) != 1:
        raise PromptError("the chat template does not place the user's text exactly once")
    before, after = rendered.split(SENTINEL)
    probe = "Probe text, with  spaces."
    if render(probe) != before + probe + after:
        raise PromptError("the chat template rewrites the user's text; po-batch cannot reuse its rendering")
    backend = tokenizer.backend_tokenizer
    enc = lambda s: backend.encode(s, add_special_tokens=False).ids
    prefix, suffix = enc(before), enc(after)
    if image and prefix.count(image_token_id) != 1:
        raise PromptError(f"the chat template renders {prefix.count(image_token_id)} image placeholders "
                          f"(token id {image_token_id}); expected exactly one")
    if tokenizer(before + probe + after).input_ids != prefix + enc(probe) + suffix:
        raise PromptError("tokenizing the prompt's parts separately differs from tokenizing it whole")
    return PromptTemplate(backend, prefix, suffix, prompt, image_token_id if image else None, merge)


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
