"""Tokenizers with the Transfusion specials: BOS/EOS/pad plus BOI/EOI around every image (DESIGN §4).

All tokenizers share one small interface: ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``boi_id``,
``eoi_id``, ``name``, ``encode(text) -> ids`` (no specials added: packing places them) and
``decode(ids) -> text`` (specials dropped). Specials missing from a pretrained vocabulary are appended
after it, so ``vocab_size`` always covers every id the model can see.
"""
from __future__ import annotations

from pathlib import Path

BOI, EOI, PAD, BOS, EOS = "<|boi|>", "<|eoi|>", "<|pad|>", "<|bos|>", "<|eos|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255, then bos=256, eos=257, pad=258, boi=259, eoi=260: the default, no file needed."""

    name = "bytes"
    bos_id, eos_id, pad_id, boi_id, eoi_id = 256, 257, 258, 259, 260
    vocab_size = 261

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A sampled sequence can cut a multi-byte character in half; replace rather than fail.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A pretrained tokenizer: a transformers tokenizer folder / hub id, or a sentencepiece ``.model``.

    A ``.model`` file (or a folder holding only ``tokenizer.model``, as Llama 2 ships it) is read with
    sentencepiece directly, which needs no config files and works offline.
    """

    def __init__(self, path_or_id: str | Path):
        path = Path(path_or_id).expanduser()
        sp_file = path / "tokenizer.model" if path.is_dir() else path
        is_hf_folder = path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        if sp_file.suffix == ".model" and sp_file.is_file() and not is_hf_folder:
            self._init_sentencepiece(sp_file)
        else:
            self._init_transformers(str(path_or_id))

    def _init_sentencepiece(self, model_file: Path) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._hf = None
        self.name = f"sentencepiece:{model_file.resolve()}"
        base = self._sp.get_piece_size()
        next_id = base

        def existing_or_new(found: int) -> int:  # sentencepiece reports an absent special as -1
            nonlocal next_id
            if found >= 0:
                return found
            next_id += 1
            return next_id - 1

        self.bos_id = existing_or_new(self._sp.bos_id())
        self.eos_id = existing_or_new(self._sp.eos_id())
        self.pad_id = existing_or_new(self._sp.pad_id())
        self.boi_id, self.eoi_id = existing_or_new(-1), existing_or_new(-1)
        self.vocab_size = next_id
        self._base_size = base

    def _init_transformers(self, path_or_id: str) -> None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path_or_id)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"tokenizer {path_or_id!r} could not be loaded: not a local tokenizer folder or sentencepiece "
                f".model file, and not available from the Hugging Face hub (offline?): {e}") from e
        self._wrap(tok, f"hf:{Path(path_or_id).resolve() if Path(path_or_id).exists() else path_or_id}")

    @classmethod
    def from_transformers(cls, tok, name: str) -> "HFTokenizer":
        """Wrap a transformers tokenizer object built in memory (e.g. ``words_tokenizer``)."""
        self = cls.__new__(cls)
        self._wrap(tok, name)
        return self

    def _wrap(self, tok, name: str) -> None:
        from transformers import AddedToken

        missing = {attr: AddedToken(text, special=True) for attr, text in
                   (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)) if getattr(tok, attr) is None}
        if missing:
            tok.add_special_tokens(missing)
        tok.add_tokens([AddedToken(BOI, special=True), AddedToken(EOI, special=True)], special_tokens=True)
        self._hf, self._sp = tok, None
        self.name = name
        self.bos_id, self.eos_id, self.pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.boi_id, self.eoi_id = tok.convert_tokens_to_ids([BOI, EOI])
        self.vocab_size = len(tok)

    @property
    def special_ids(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id}

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text))
        # split_special_tokens: a caption that contains "<|endoftext|>" is text, never a control id.
        return list(self._hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        specials = self.special_ids
        if self._sp is not None:
            return self._sp.decode([int(i) for i in ids if i not in specials and 0 <= i < self._base_size])
        return self._hf.decode([int(i) for i in ids if i not in specials], skip_special_tokens=True)


def words_tokenizer(words: list[str], name: str) -> HFTokenizer:
    """One id per word of a closed vocabulary (a transformers ``WordLevel`` tokenizer built in memory):
    lower-cased, split on whitespace and punctuation, anything else ``<unk>``. For a data set whose
    captions come from a small grammar, a word is one token: captions are ~4-5x shorter than in bytes
    and every fact of a caption sits in one position (the main job: with 4x4 patches, 28 examples per
    step instead of 8)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer.from_transformers(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"), name)


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` -> the built-in byte tokenizer; ``"shapes-words"`` -> one id per word of the shapes
    grammar (no file needed); anything else is a tokenizer path or hub id."""
    if not spec:
        raise ValueError("data.tokenizer is empty; use 'bytes', 'shapes-words' or a tokenizer folder / "
                         ".model file / hub id")
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "shapes-words":
        from .shapes import vocabulary

        return words_tokenizer(vocabulary(), spec)
    return HFTokenizer(spec)
