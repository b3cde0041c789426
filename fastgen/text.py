"""Offline tokenizers for the tiny and default pipelines.

No tokenizer can be downloaded here, so fastgen builds a real ``transformers.CLIPTokenizer`` (byte-level
BPE, the class SD/SDXL/SD3/FLUX load) from a vocabulary it writes itself: the 256 byte symbols, their
end-of-word forms, and BPE merges that make each word of a given word list a single token. Any text
still tokenizes (unknown words fall back to bytes); known words cost one token each, which is what a
tiny text encoder trained on a small world needs.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["BASE_WORDS", "build_word_tokenizer", "bytes_to_unicode", "prefix_chain_bpe"]

#: Words every fastgen tokenizer knows as single tokens (the shapes world adds its own vocabulary).
BASE_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "on", "in", "with", "photo", "picture", "image", "cat", "dog",
    "sitting", "red", "green", "blue", "yellow", "sofa", "astronaut", "riding", "horse",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the one byte-level BPE uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def prefix_chain_bpe(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE tables in which each word is one token: every byte symbol (plain and word-final
    ``</w>``), then for each word in the given order the chain of merges that builds it left to right
    (``c + a``, ``ca + t</w>``), then the two CLIP specials.

    Known quirk (it fixes the zoo's shipped token ids, so it stays): merges of earlier words can pre-empt a
    later word's chain, so a few words of a large set end up as more than one token.
    """
    byte_syms = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in byte_syms:
        vocab.setdefault(s, len(vocab))
    for s in byte_syms:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        syms = list(word[:-1]) + [word[-1] + "</w>"]
        left = syms[0]
        for right in syms[1:]:
            pair = (left, right)
            left = left + right
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


@lru_cache(maxsize=8)
def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = sorted(set(w.lower() for w in words))
    for word in words:
        if not word.isascii() or not word.isalpha():
            raise ValueError(f"tokenizer words must be ASCII letters only, got {word!r}")
    return prefix_chain_bpe(words)


def build_word_tokenizer(words: tuple[str, ...] | list[str] = BASE_WORDS, model_max_length: int = 77):
    """Return a ``CLIPTokenizer`` in which each of ``words`` is one token (built offline, no files needed).

    Args:
        words: ASCII words to make single tokens. Other text still tokenizes byte by byte.
        model_max_length: the tokenizer's maximum length (77 like CLIP).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges(tuple(words))
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.model_max_length = model_max_length
    return tok
