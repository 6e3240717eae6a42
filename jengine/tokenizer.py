"""Text <-> token ids and chat templates, from a `tokenizer.json` or from a GGUF's metadata.

Built on the `tokenizers` library (no transformers at run time). A GGUF carries no tokenizer.json:
its vocabulary, merges, token types and pre-tokenizer name are metadata, from which
`_gguf_backend` rebuilds the tokenizer: byte-level BPE (GPT-2 style, as SmolLM2, Llama 3 and Qwen
use), or Gemma's SentencePiece BPE with byte fallback (`tokenizer.ggml.model="llama"`), giving
the ids transformers' GGUF tokenizer gives. Chat templates are rendered in a sandboxed jinja2
environment, as transformers does.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

# llama.cpp `tokenizer.ggml.pre` names -> how its regexes split text before BPE. GPT-2's own regex
# is ByteLevel(use_regex=True); the others split first and leave ByteLevel only the byte mapping.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2", "gpt-2")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell")  # llama.cpp: "\p{N}" first
_SPLIT_PRE = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs from the model's tokenizer config.

    Attributes:
      backend: the `tokenizers.Tokenizer`.
      chat_template: jinja2 source, or None.
      bos_token_id: None when the vocabulary has no BOS.
      eos_token_ids: every id that ends a generation (EOS, and EOT where the model has one).
    """

    backend: tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) stay whole.
        `add_special_tokens` adds what the tokenizer adds around a sequence (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id) or ""

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The chat template rendered as text (tokenize it with `encode`).

        Raises:
          ValueError: the tokenizer has no chat template, or the template raised.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        return _compile(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.bos_token_id),
            eos_token=self._token(eos),
            **kwargs,
        )


# vLLM's incremental detokenization: a new token is decoded together with the few before it, so
# a character that spans tokens (UTF-8 bytes, SentencePiece's leading space) comes out whole.
_DETOKENIZE_CONTEXT = 5


class IncrementalDetokenizer:
    """The text of a request's generated tokens, built one token at a time, with vLLM's stop
    string semantics (`SamplingParams.stop`, `include_stop_str_in_output`).

    Each token is decoded with the (up to) 5 tokens before it, the prompt's last ones at first,
    and its text is appended once it is no longer an incomplete character (vLLM's
    `detokenize_incrementally`); special tokens are skipped. A stop string is looked for in the
    generated text only (never in the prompt), in the part that ends with the new characters, so
    one that spans several tokens is found at the token that completes it.

    Attributes:
      text: the generated text so far (cut at the stop string once one is found).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:  # fmt: skip
        self.tokenizer, self.stop, self.include = tokenizer, tuple(stop), include_stop_str_in_output
        self._ids = list(prompt_ids[-(_DETOKENIZE_CONTEXT + 2) :])
        self._read = len(self._ids)
        self._prefix = max(self._read - _DETOKENIZE_CONTEXT, 0)
        self.text = ""

    def push(self, token_id: int, decode: bool = True) -> str | None:
        """Adds the next generated token; returns the stop string it completed, else None.

        `decode=False` adds the token without its text (vLLM leaves out the text of a token that
        ended the request as EOS or a stop token id, unless `include_stop_str_in_output`)."""
        self._ids.append(token_id)
        if not decode:
            return None
        before = self.tokenizer.decode(self._ids[self._prefix : self._read])
        after = self.tokenizer.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None  # no whole new character yet
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += new
        return self._find_stop(len(new))

    def _find_stop(self, new_chars: int) -> str | None:
        """vLLM's `StopChecker.check_stop_strings`: the first of `stop` (in order) found ending
        within the last `new_chars` characters; the text is cut before it, or after it with
        `include_stop_str_in_output`."""
        for s in self.stop:
            at = self.text.find(s, max(len(self.text) - new_chars - len(s) + 1, 0))
            if at != -1:
                self.text = self.text[: at + len(s) if self.include else at]
                return s
        return None


def _compile(template: str):
    """A template in the sandboxed environment transformers uses (trim/lstrip blocks, tojson,
    raise_exception, strftime_now, loop controls)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


# --- from tokenizer.json ------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_str(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _ids(value: Any) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _from_tokenizer_json(path: str) -> Tokenizer:
    directory = os.path.dirname(path)
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    eos = [backend.token_to_id(t) for t in [_token_str(config.get("eos_token"))] if t]
    eos += _ids(_read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id"))
    bos = _token_str(config.get("bos_token"))
    return Tokenizer(
        backend=backend,
        chat_template=template,
        bos_token_id=backend.token_to_id(bos) if bos else None,
        eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
    )


# --- from GGUF metadata --------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _pre_tokenizer(pre: str | None, source: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre is None or pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = sorted([*_GPT2_PRE, *_DIGITS_THEN_GPT2_PRE, *_SPLIT_PRE])
    raise ValueError(f"{source}: unsupported tokenizer.ggml.pre={pre!r}; supported: {known}")


def _byte_level_bpe(meta: Mapping[str, Any], source: str) -> tuple[tokenizers.Tokenizer, list[str]]:
    """Byte-level BPE from `tokenizer.ggml.{tokens, merges, pre}`; (tokenizer, its vocabulary).

    A token spelled outside the byte alphabet (a llama.cpp mislabel) is respelled byte-wise, as
    transformers does.
    """
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        for t in meta["tokenizer.ggml.tokens"]
    ]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), source)
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def _rank_merges(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary that lists none: every split of a token into two
    tokens, best first by the token's position in the list (transformers' `generate_merges`
    with Gemma's position scores: Gemma's stored scores do not follow its merge order)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, index in vocab.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))]
        pairs = sorted(
            ((a, b) for a, b in pairs if a in vocab and b in vocab),
            key=lambda p: (vocab[p[0]], vocab[p[1]]),
        )
        merges += [(a, b, -index) for a, b in pairs]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gemma_sentencepiece(meta: Mapping[str, Any]) -> tuple[tokenizers.Tokenizer, list[str]]:
    """Gemma's SentencePiece BPE (spaces as "▁", byte fallback), as transformers' GemmaTokenizer
    builds it from a GGUF: tokens of only spaces respelled with "▁", merges from token order."""
    tokens = [
        "\u2581" * len(t) if " " in t and not t.strip() else t
        for t in meta["tokenizer.ggml.tokens"]
    ]
    merges = meta.get("tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges else _rank_merges(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 3)]
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return backend, tokens


def _gguf_backend(meta: Mapping[str, Any], source: str) -> tokenizers.Tokenizer:
    """The tokenizer `tokenizer.ggml.*` describes: byte-level BPE ('gpt2') or, for a Gemma
    architecture, SentencePiece BPE ('llama').

    Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added
    tokens, so either stays whole when written in text. A control token outside the byte-level
    alphabet is a llama.cpp mislabel and is skipped (adding it would grow the vocabulary).
    """
    kind, arch = meta.get("tokenizer.ggml.model"), meta.get("general.architecture", "")
    if kind == "gpt2":
        backend, vocab = _byte_level_bpe(meta, source)
        alphabet = set(_bytes_to_unicode().values())
    elif kind == "llama" and arch.startswith("gemma"):
        backend, vocab = _gemma_sentencepiece(meta)
        alphabet = None
    else:
        raise ValueError(
            f"{source}: tokenizer.ggml.model={kind!r} (architecture {arch!r}); jengine reads "
            "byte-level 'gpt2' BPE and Gemma's 'llama' SentencePiece"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    known = set(vocab)
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in known
        ]
    )
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)],
        )
    return backend


def _from_gguf(path: str) -> Tokenizer:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    meta = {
        k: f.contents()
        for k, f in reader.fields.items()
        if k.startswith("tokenizer.") or k == "general.architecture"
    }
    eos = [
        meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta
    ]
    if meta.get("general.architecture", "").startswith("gemma"):  # a turn ends a generation too
        tokens = meta["tokenizer.ggml.tokens"]
        eos += [tokens.index(t) for t in ["<end_of_turn>"] if t in tokens]
    return Tokenizer(
        backend=_gguf_backend(meta, path),
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
    )


def load_tokenizer(path: str) -> Tokenizer:
    """A `Tokenizer` from a dir with tokenizer.json (plus tokenizer_config.json /
    chat_template.jinja / generation_config.json when present), a tokenizer.json file, a `.gguf`
    file, or a dir holding exactly one `.gguf`.

    Raises:
      ValueError: nothing to read at `path`, or a file that cannot be read (named).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return _from_tokenizer_json(os.path.join(path, "tokenizer.json"))
        ggufs = [e for e in sorted(os.listdir(path)) if e.endswith(".gguf")]
        if len(ggufs) == 1:
            return _from_gguf(os.path.join(path, ggufs[0]))
        raise ValueError(f"{path}: no tokenizer.json and not exactly one .gguf (found {ggufs})")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file or directory")
    if path.endswith(".gguf"):
        return _from_gguf(path)
    return _from_tokenizer_json(path)
