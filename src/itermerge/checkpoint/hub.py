"""A Hub id (``org/name``) where the code reads checkpoint files itself (the merge, MergeBasis, ZeRO-3's float32
masters): the snapshot in the local Hugging Face cache, fetched there first when the Hub is reachable."""

from __future__ import annotations

import os
from pathlib import Path

from itermerge.errors import ItermergeError

# What a merge or a float32 master copy reads: weights, their index, the config and tokenizer files beside them.
PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]


def looks_like_hub_id(spec: str | os.PathLike) -> bool:
    text = str(spec)
    return not Path(text).exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1


def hub_snapshot(repo_id: str) -> Path:
    """The local directory of ``repo_id``'s snapshot (the cache's, downloaded once; offline: what the cache has)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise ItermergeError(f"{repo_id}: a Hub id needs the huggingface_hub package (pip install huggingface_hub)"
                             ) from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS))
    except LocalEntryNotFoundError:
        raise ItermergeError(f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached; "
                             "download it where the Hub is reachable, or give a local directory") from None
    except Exception as e:  # a missing or gated repository: the Hub's own words
        raise ItermergeError(f"{repo_id}: cannot fetch it from the Hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); give a local directory") from None
