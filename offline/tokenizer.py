"""The real CLIP BPE tokenizer, built offline from the vocabulary open_clip ships.

Stable Diffusion v1 uses OpenAI CLIP's byte-level BPE (49,408 tokens). No model hub is reachable
here, but `open_clip_torch` bundles the original merge list `bpe_simple_vocab_16e6.txt.gz`; the
Hugging Face `vocab.json` / `merges.txt` pair is a pure function of it (same order as
`open_clip.tokenizer.SimpleTokenizer` and OpenAI's `clip/simple_tokenizer.py`):

    ids 0..255        the 256 byte symbols (GPT-2's `bytes_to_unicode` table)
    ids 256..511      the same symbols + "</w>" (end of word)
    ids 512..49405    one token per merge, in merge-rank order (48,894 merges)
    ids 49406, 49407  <|startoftext|>, <|endoftext|>
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

# GPT-2/CLIP's reversible byte -> printable-unicode table, as the tokenizers themselves use it.
from transformers.convert_slow_tokenizer import bytes_to_unicode

from core.atomic import write_text_atomic
from core.errors import UserInputError
from core.paths import default_cache_root

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894: every token that is neither a byte nor special
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP's context length, what SD v1 pipelines pad prompts to


def find_open_clip_bpe() -> Path:
    """Locate open_clip's bundled merge list without importing open_clip (it pulls in torch)."""
    spec = importlib.util.find_spec("open_clip")
    locations = spec.submodule_search_locations if spec is not None else None
    for folder in locations or []:
        candidate = Path(folder) / BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise UserInputError(
        f"cannot find {BPE_FILENAME}: install open_clip_torch, which ships the CLIP vocabulary"
    )


def derive_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Return (token → id, merge lines "a b") derived from OpenAI's merge list."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise UserInputError(f"{bpe_gz} gives {len(vocab)} CLIP tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_vocab_files(folder: Path) -> tuple[Path, Path]:
    """Write HF `vocab.json` + `merges.txt` into `folder` (once) and return their paths."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return vocab_path, merges_path
    vocab, merges = derive_vocab_and_merges(find_open_clip_bpe())
    folder.mkdir(parents=True, exist_ok=True)
    # A concurrent reader never sees half a file.
    write_text_atomic(vocab_path, json.dumps(vocab, ensure_ascii=False))
    write_text_atomic(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def build_clip_tokenizer(cache_dir: str | None = None) -> CLIPTokenizer:
    """The SD v1 / OpenAI CLIP tokenizer, built offline; derived files cached under `cache_dir`.

    `cache_dir` defaults to `$SD_DISTILL_CACHE` or `~/.cache/sd-distill`; the files live in its
    `clip-tokenizer/` subfolder.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_root()
    vocab_path, merges_path = write_vocab_files(folder / "clip-tokenizer")
    # transformers 5.23: `CLIPTokenizer(vocab_file=..., merges_file=...)` is accepted but ignored
    # (an empty 3-token vocab results); the first two positional parameters are `vocab, merges`.
    tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=MODEL_MAX_LENGTH)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"CLIPTokenizer loaded {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer
