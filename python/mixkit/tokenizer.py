"""Tokenizers behind one small interface, and Mistral / Llama 2 chat prompts.

Every tokenizer has `encode(text) -> list[int]` (no special tokens added),
`decode(ids) -> str` (special tokens dropped), `vocab_size`, `bos_id`, `eos_id`
and `pad_id` (None when the vocabulary has none). Adding BOS/EOS is the
caller's job (mixkit.data's packer, `encode_chat`), so the same rule holds for
all three kinds.

All three pickle by value (the HF tokenizer as its JSON, SentencePiece as its
model proto), so mixkit.data can hand them to spawned worker processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence


class Tokenizer:
    """The interface; subclasses set the attributes and the two methods."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text (the HF tokenizer does them in parallel)."""
        return [self.encode(t) for t in texts]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, BOS = 256, EOS = 257, vocab_size 258, no pad.

    Lossless for every Python str that UTF-8 can encode (lone surrogates raise
    UnicodeEncodeError). The embedded tiny configs have vocab_size 256; a
    model that is to see BOS/EOS needs `args.replace(vocab_size=258)`.
    """

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    pad_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def save(self, directory: str | Path) -> Path:
        """Write the same tokenizer as a Hugging Face tokenizer.json (byte-level,
        no merges: id i is byte i, <s> = 256, </s> = 257) with its
        tokenizer_config.json, so that a model directory carries it and
        `load_tokenizer` and `transformers` read it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text(_byte_level_json())
        _write_tokenizer_config(d, self)
        return d


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` package.

    BOS/EOS/PAD are found by their usual spellings (<s>, </s>, <pad>; and
    <|endoftext|>, <|padding|> for GPT-NeoX-style vocabularies such as OLMo's),
    or given explicitly as token strings.
    """

    def __init__(self, path: str | Path | None = None, *, json: str | None = None,
                 bos: str | None = None, eos: str | None = None, pad: str | None = None,
                 split_special_tokens: bool = False):
        from tokenizers import Tokenizer as _Tok

        if (path is None) == (json is None):
            raise ValueError("HFTokenizer: pass exactly one of path and json")
        self.path = Path(path) if path is not None else None
        self._tok = _Tok.from_file(str(path)) if path is not None else _Tok.from_str(json)
        # split_special_tokens (transformers' tokenizer_config.json key of the
        # same name): text spelling "<s>" encodes as its characters, never as
        # BOS, so every text round-trips (source code does contain "</s>").
        self._tok.encode_special_tokens = split_special_tokens
        self.split_special_tokens = split_special_tokens
        self._names = (bos, eos, pad)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(bos, ("<s>", "<|begin_of_text|>", "<|endoftext|>"))
        self.eos_id = self._find(eos, ("</s>", "<|end_of_text|>", "<|endoftext|>"))
        self.pad_id = self._find(pad, ("<pad>", "<|padding|>", "[PAD]"))

    def _find(self, given: str | None, spellings: tuple[str, ...]) -> int | None:
        if given is not None:
            tid = self._tok.token_to_id(given)
            if tid is None:
                raise ValueError(f"HFTokenizer: token {given!r} is not in the vocabulary")
            return tid
        for s in spellings:
            tid = self._tok.token_to_id(s)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __getstate__(self):
        return {"json": self._tok.to_str(), "names": self._names, "path": self.path,
                "split_special_tokens": self.split_special_tokens}

    def __setstate__(self, state):
        bos, eos, pad = state["names"]
        self.__init__(json=state["json"], bos=bos, eos=eos, pad=pad,
                      split_special_tokens=state.get("split_special_tokens", False))
        self.path = state["path"]

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text(self._tok.to_str(pretty=True))
        _write_tokenizer_config(d, self)
        return d

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `tokenizer.model` (Llama 2, Mistral 7B v0.1, Mixtral)."""

    def __init__(self, path: str | Path | None = None, *, model_proto: bytes | None = None):
        try:
            import sentencepiece as spm
        except ImportError as exc:
            raise ImportError("SentencePieceTokenizer needs the `sentencepiece` package: "
                              "pip install sentencepiece") from exc
        if (path is None) == (model_proto is None):
            raise ValueError("SentencePieceTokenizer: pass exactly one of path and model_proto")
        self.path = Path(path) if path is not None else None
        self._sp = (spm.SentencePieceProcessor(model_file=str(path)) if path is not None
                    else spm.SentencePieceProcessor(model_proto=model_proto))
        self.vocab_size = self._sp.get_piece_size()
        # sentencepiece reports a disabled special id as -1.
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in
                                                 (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"proto": self._sp.serialized_model_proto(), "path": self.path}

    def __setstate__(self, state):
        self.__init__(model_proto=state["proto"])
        self.path = state["path"]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _byte_level_json() -> str:
    """ByteTokenizer as a Hugging Face tokenizer.json: the ByteLevel
    pre-tokenizer maps each byte to one printable character (GPT-2's table),
    a merge-free BPE maps that character to the byte's value."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table = _bytes_to_unicode()
    tok = _Tok(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok.to_str(pretty=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel uses):
    printable Latin-1 bytes map to themselves, the rest to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_tokenizer_config(d: Path, tok: Tokenizer) -> None:
    """tokenizer_config.json as transformers reads it (PreTrainedTokenizerFast)."""
    import json

    names = {}
    if isinstance(tok, HFTokenizer):
        for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
            if tid is not None:
                names[key] = tok._tok.id_to_token(tid)
        split = tok.split_special_tokens
    else:
        names, split = {"bos_token": "<s>", "eos_token": "</s>"}, True
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "split_special_tokens": split,
           "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer, Hugging Face `tokenizers`)
    trained on texts: vocab_size ids in all, <s> = 0 and </s> = 1 first, then
    the 256 bytes, then merges. Lossless: every str round-trips (special-token
    spellings in the text stay text)."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"train_bpe: vocab_size must be >= 258 (two specials and 256 bytes), got {vocab_size}")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.encode_special_tokens = True
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(json=tok.to_str(), split_special_tokens=True)


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write tok into a model directory (tokenizer.json + tokenizer_config.json;
    SentencePiece: tokenizer.model), for `load_tokenizer` and transformers."""
    if isinstance(tok, (ByteTokenizer, HFTokenizer)):
        return tok.save(directory)
    if isinstance(tok, SentencePieceTokenizer):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(tok._sp.serialized_model_proto())
        return d
    raise TypeError(f"save_tokenizer: cannot save {tok!r}")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory: tokenizer.json (preferred, it
    is what `transformers` uses) or else SentencePiece's tokenizer.model.
    tokenizer_config.json's split_special_tokens is honoured."""
    import json

    d = Path(directory)
    if d.is_file():
        d, names = d.parent, [d.name]
    else:
        names = ["tokenizer.json", "tokenizer.model"]
    for name in names:
        if name == "tokenizer.json" and (d / name).is_file():
            cfg_path = d / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            return HFTokenizer(d / name, split_special_tokens=bool(cfg.get("split_special_tokens", False)))
        if name == "tokenizer.model" and (d / name).is_file():
            return SentencePieceTokenizer(d / name)
    raise FileNotFoundError(f"load_tokenizer: {directory} has no tokenizer.json or tokenizer.model")


# ---------------------------------------------------------------- chat format

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
CHAT_STYLES = ("mistral", "llama2")


def _turns(messages: Sequence[dict]) -> list[tuple[str, str | None]]:
    """[(user, answer or None)], with an optional system message folded into
    the first user message as Llama 2's <<SYS>> block."""
    msgs = [dict(m) for m in messages]
    for m in msgs:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"format_chat: each message needs role system/user/assistant and str content, got {m!r}")
    if msgs and msgs[0]["role"] == "system":
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise ValueError("format_chat: a system message must be followed by a user message")
        msgs = [{"role": "user", "content": B_SYS + msgs[0]["content"].strip() + E_SYS + msgs[1]["content"].strip()}
                ] + msgs[2:]
    if not msgs:
        raise ValueError("format_chat: no messages")
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"format_chat: message {i} has role {m['role']!r}, expected {want!r} "
                             "(user and assistant must alternate, starting with user)")
    users = [m["content"].strip() for m in msgs[0::2]]
    answers = [m["content"].strip() for m in msgs[1::2]] + [None] * (len(users) - len(msgs[1::2]))
    return list(zip(users, answers))


def _chat_chunks(messages, style):
    """[(kind, text)] with kind "bos", "eos", "prompt" or "answer"."""
    if style not in CHAT_STYLES:
        raise ValueError(f"format_chat: style must be one of {CHAT_STYLES}, got {style!r}")
    chunks = []
    for i, (user, answer) in enumerate(_turns(messages)):
        if style == "llama2" or i == 0:
            chunks.append(("bos", ""))
        if style == "llama2":
            chunks.append(("prompt", f"{B_INST} {user} {E_INST}"))
            if answer is not None:
                chunks += [("answer", f" {answer} "), ("eos", "")]
        else:
            chunks.append(("prompt", f"{B_INST} {user} {E_INST}"))
            if answer is not None:
                chunks += [("answer", f" {answer}"), ("eos", "")]
    return chunks


def format_chat(messages: Sequence[dict], *, bos: str = "<s>", eos: str = "</s>", style: str = "mistral") -> str:
    """The chat prompt as text. messages: [{"role": "system"|"user"|"assistant",
    "content": str}], user and assistant alternating, an optional system
    message first. Contents are stripped.

    style="mistral" (Mistral 7B Instruct, Mixtral Instruct): one BOS, then per turn
        `[INST] {user} [/INST] {answer}</s>`   e.g.
        `<s>[INST] Hi [/INST] Hello</s>[INST] More? [/INST]`
    style="llama2" (Meta's Llama 2 chat reference code): every turn in its own BOS/EOS,
        `<s>[INST] {user} [/INST] {answer} </s>`   e.g.
        `<s>[INST] Hi [/INST] Hello </s><s>[INST] More? [/INST]`
    A system message becomes `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n` at the start of
    the first user message, in both styles. A conversation ending with a user
    message ends with `[/INST]`: the prompt for the model's next answer.

    The text with literal "<s>" is what HF tokenizer.json files parse into
    special tokens; SentencePiece does not, so for token ids use `encode_chat`.
    """
    return "".join(bos if k == "bos" else eos if k == "eos" else t for k, t in _chat_chunks(messages, style))


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], *, style: str = "mistral"
                ) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of the `format_chat` conversation: BOS/EOS as the
    tokenizer's ids, each text chunk encoded on its own (so the mask falls on
    a token boundary), and loss_mask True on answer tokens and the EOS that
    ends each answer (the Llama 2 SFT recipe: no loss on prompt tokens)."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(f"encode_chat: {tokenizer!r} has no BOS or EOS token")
    ids: list[int] = []
    mask: list[bool] = []
    for kind, text in _chat_chunks(messages, style):
        new = ([tokenizer.bos_id] if kind == "bos" else [tokenizer.eos_id] if kind == "eos"
               else tokenizer.encode(text))
        ids += new
        mask += [kind in ("answer", "eos")] * len(new)
    return ids, mask
