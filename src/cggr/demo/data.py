"""Text every Python install has, a BPE tokenizer trained on it, and seeded batches."""
from __future__ import annotations

import os
import sysconfig
from typing import List, Optional, Tuple

import torch


def pydoc_topics_text() -> str:
    """The standard library's own help topics (about 0.5 MB of English prose and code)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))


def stdlib_source_files(max_bytes: int) -> List[str]:
    """Paths of the standard library's ``.py`` files (tests and site-packages left out),
    sorted, up to about ``max_bytes`` in all."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "idle_test", "__pycache__"))
        paths.extend(os.path.join(folder, name) for name in sorted(files) if name.endswith(".py"))
    chosen, total = [], 0
    for path in paths:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def read_texts(paths: List[str]) -> List[str]:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def train_tokenizer(texts: List[str], vocab_size: int):
    """A byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on ``texts``."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as error:
        raise ImportError("the demo needs the 'tokenizers' package: pip install 'cggr[demo]'") from error
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(tokenizer, texts: List[str]) -> torch.Tensor:
    """All texts as one int64 token stream."""
    ids: List[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.int64)


def split_held_out(texts: List[str], held_out_fraction: float) -> Tuple[List[str], List[str]]:
    """Every n-th document is held out (whole documents, so no text leaks across)."""
    step = max(2, round(1 / held_out_fraction))
    return ([t for i, t in enumerate(texts) if i % step != step - 1],
            [t for i, t in enumerate(texts) if i % step == step - 1])


def chunk_text(text: str, pieces: int) -> List[str]:
    """One long text cut into ``pieces`` documents at paragraph breaks."""
    paragraphs = text.split("\n\n")
    size = max(1, len(paragraphs) // pieces)
    return ["\n\n".join(paragraphs[i:i + size]) for i in range(0, len(paragraphs), size)]


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator,
                 device: Optional[torch.device] = None):
    """``(inputs, targets)`` of shape ``[batch, seq_len]``: random windows of the stream."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=generator)
    windows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
    windows = windows.to(device) if device is not None else windows
    return windows[:, :-1], windows[:, 1:]
