"""The one parser of list flags (--labels, --texts, --layers, --alphas, ...): comma-separated, quoted like CSV.

'"red, circle",blue square' -> ['red, circle', 'blue square']: a field in double quotes may hold commas
(a doubled "" is a quote), as in a CSV row. Blank numbers are dropped, blank labels refused by the caller;
an empty list is an error.
"""
from __future__ import annotations

import csv


def split_list(text: str, option: str, example: str, keep_blank: bool = False) -> list[str]:
    """The stripped fields of `text` (blank ones dropped unless `keep_blank`: the caller refuses them);
    ValueError naming `option` (with `example`) when none is non-blank or the text is unparsable."""
    try:
        rows = list(csv.reader([text], skipinitialspace=True))
    except csv.Error as err:
        raise ValueError(f"{option}: cannot parse {text!r} as a comma-separated list ({err}); "
                         f"quote an entry that holds a comma, e.g. {example}") from None
    fields = [field.strip() for field in (rows[0] if rows else [])]  # one line: one row
    if not any(fields):
        raise ValueError(f"{option} is empty: give at least one entry, e.g. {option} {example}")
    return fields if keep_blank else [field for field in fields if field]


def typed_list(kind, option: str, example: str):
    """An argparse `type=` parsing a non-empty list of `kind` (int or float) into a tuple."""
    name = "ints" if kind is int else "numbers"

    def parse(text: str) -> tuple:
        fields = split_list(text, option, example)
        try:
            return tuple(kind(field) for field in fields)
        except ValueError:
            raise ValueError(f"{option} must be comma-separated {name} such as {example}, got {text!r}") from None
    parse.__name__ = f"{option} list"
    return parse
