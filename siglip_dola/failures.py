"""What to say when inputs fail: every item failing is an error with its grouped reasons, and long lists of
names are shortened to the first few and a count (one rule for every command and warning)."""
from __future__ import annotations

import os
import re
from collections import Counter

SHOWN = 5          # names shown in a list before "... and N more"
SHOWN_REASONS = 3  # distinct reasons shown when every item failed


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    """'1 segment', '2 segments' (`plural` for irregular nouns)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def first_few(names, shown: int = SHOWN) -> str:
    """'a', 'b', 'c' and 7 more: the first `shown` names (repr) and a count of the rest."""
    names = list(names)
    text = ", ".join(repr(str(name)) for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _reason(path, error) -> str:
    """The error with its file's name taken out, so that one cause on many files is one reason."""
    text = str(error)
    names = {str(path), os.path.abspath(str(path)), os.path.realpath(str(path)), os.path.basename(str(path))}
    for name in sorted(names - {""}, key=len, reverse=True):  # the full path before its base name
        text = text.replace(name, "<file>")
    return re.sub(r"\s+", " ", text).strip()


def grouped_reasons(skipped, shown: int = SHOWN_REASONS) -> str:
    """'3x "UnidentifiedImageError: ..." (e.g. a.png); 1x ...' for [(path, error)] or [{"path", "error"}]."""
    counts, examples = Counter(), {}
    for item in skipped:
        path, error = (item["path"], item["error"]) if isinstance(item, dict) else item
        reason = _reason(path, error)
        counts[reason] += 1
        examples.setdefault(reason, path)
    parts = [f"{count}x {reason!r} (e.g. {os.path.basename(str(examples[reason])) or examples[reason]})"
             for reason, count in counts.most_common(shown)]
    if len(counts) > shown:
        parts.append(f"and {len(counts) - shown} other reason(s)")
    return "; ".join(parts)


def all_failed_message(what: str, skipped) -> str:
    """The error when every one of `skipped` failed: the count, the first distinct reasons, and where to look."""
    skipped = list(skipped)
    return (f"every one of the {len(skipped)} {what} failed: {grouped_reasons(skipped)}. When all inputs fail, "
            "the cause is usually the environment (a missing image decoder, a broken install) or the "
            "preprocessing, not the files themselves")
