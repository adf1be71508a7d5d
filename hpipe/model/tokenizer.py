"""Tokenizers: an HF ``tokenizer.json`` or a GGUF's embedded vocabulary, both as ``tokenizers`` objects.

``Tokenizer.chat_prompt`` renders the model's own chat template (jinja2, which torch already
requires) in a sandbox, the way transformers' ``apply_chat_template`` does, so an instruct model
sees the prompt format it was trained on. A model without a template gets the plain text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from hpipe.errors import ChatTemplateError, TokenizerNotFoundError, UnsupportedArchitectureError


class Tokenizer:
    """encode / decode / chat_prompt over a ``tokenizers.Tokenizer``."""

    def __init__(
        self, backend: Backend, *, eos_token_ids: Sequence[int], bos_token: str | None = None,
        eos_token: str | None = None, chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # A chat prompt already carries its BOS as text; adding another would shift the model.
        has_bos_text = self.bos_token is not None and text.startswith(self.bos_token)
        return self.backend.encode(text, add_special_tokens=not has_bos_text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user_text: str, *, system: str | None = None) -> str:
        """The model's chat template applied to one user turn, ready for the assistant's reply."""
        if not self.chat_template:
            return user_text
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_text}]
        return self.chat_messages(messages)

    def chat_messages(self, messages: list[dict]) -> str:
        """The model's chat template applied to a conversation (``[{"role", "content"}]``),
        ready for the assistant's reply. Without a template: the contents, one per line."""
        if not self.chat_template:
            return "\n".join(str(m.get("content", "")) for m in messages)
        return _render_chat(self.chat_template, messages, bos_token=self.bos_token or "",
                            eos_token=self.eos_token or "")


class NoTokenizer:
    """Stands in when a checkpoint has no tokenizer we can build; ids still work, text does not."""

    def __init__(self, reason: str, *, eos_token_ids: Sequence[int]) -> None:
        self.reason = reason
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = None

    def _fail(self, *_args, **_kwargs):
        raise TokenizerNotFoundError(f"{self.reason}; pass token ids instead (--prompt-ids 1,2,3)")

    encode = decode = chat_prompt = _fail


def _render_chat(template: str, messages: list[dict], **special: str) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    # Same environment options as transformers' apply_chat_template, so templates written for it
    # render identically (trim_blocks / lstrip_blocks change whitespace).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                **special)
    except TemplateError as e:  # also TemplateSyntaxError; the template is the model's, not ours
        raise ChatTemplateError(
            f"the model's chat template does not render these messages: "
            f"{type(e).__name__}: {e}; pass --no-chat to send the prompt text as it is") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, Mapping):  # {"content": "<s>", "lstrip": false, ...}
        return value.get("content")
    return value


def tokenizer_from_hf_dir(model_dir: Path, *, eos_token_ids: Sequence[int]) -> Tokenizer | NoTokenizer:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return NoTokenizer(f"no tokenizer.json in {str(model_dir)!r}", eos_token_ids=eos_token_ids)
    cfg_path = model_dir / "tokenizer_config.json"
    try:
        backend = Backend.from_file(str(path))
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        # Token ids still run; text then fails naming the file (NoTokenizer).
        return NoTokenizer(f"cannot read the tokenizer of {str(model_dir)!r} "
                           f"({type(e).__name__}: {e})", eos_token_ids=eos_token_ids)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = model_dir / "chat_template.jinja"
    if template is None and jinja_file.exists():
        template = jinja_file.read_text()
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    eos_ids = list(eos_token_ids)
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        eos_ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if eos is not None and backend.token_to_id(eos) is not None:
        eos_ids.append(backend.token_to_id(eos))
    return Tokenizer(backend, eos_token_ids=tuple(dict.fromkeys(eos_ids)), bos_token=bos,
                     eos_token=eos, chat_template=template)


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split rules of the original
# tokenizer.json (llama.cpp's llama-vocab.cpp lists the same regexes).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gguf_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact", "codeshell"):  # GPT-2 regex after splitting digits
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = _LLAMA3_SPLIT if pre != "qwen2" else _QWEN2_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedArchitectureError(
        f"unsupported GGUF pre-tokenizer {pre!r}; hpipe builds default, gpt-2, smollm, starcoder, "
        "refact, codeshell, llama-bpe, qwen2")


_GGUF_SPECIAL_TYPES = (3, 4)  # llama.cpp token types CONTROL and USER_DEFINED


def tokenizer_from_gguf(metadata: Mapping[str, Any], *, eos_token_ids: Sequence[int]) -> Tokenizer | NoTokenizer:
    """A byte-level BPE tokenizer from a GGUF's embedded vocabulary and merges."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        # SentencePiece vocabularies ("llama") would need merges rebuilt from scores.
        return NoTokenizer(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' BPE)",
                           eos_token_ids=eos_token_ids)
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, kind_id in zip(tokens, types) if kind_id in _GGUF_SPECIAL_TYPES])
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return Tokenizer(
        backend, eos_token_ids=eos_token_ids, bos_token=bos,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        chat_template=metadata.get("tokenizer.chat_template"))
