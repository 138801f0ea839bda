"""Candidate premature layers: the one place that turns ``layers=`` / ``bucket=`` into checked layer numbers
(:class:`LayerSelection`, by the one rule :func:`checked_layers`), and the one default-layer policy
(:func:`default_layers`).

Layer j (1..N) is the output of transformer block j; layer N is the final (mature) layer and is
never a candidate. Buckets are 1-based, contiguous, inclusive ranges of 1..N. When N is not
divisible by ``n_buckets`` the split is as even as possible: bucket sizes differ by at most one and
the first ``N % n_buckets`` buckets are the larger ones (``numpy.array_split`` convention), e.g.
N=26, 3 buckets -> [1,9], [10,18], [19,26].
"""
from __future__ import annotations

import operator
from collections.abc import Iterable

from siglip_dola.modes import MODES, mode_of

PARITIES = ("even", "odd", "all")
DEFAULT_N_BUCKETS = 3  # the design note: buckets [1,8], [9,16], [17,24] for N = 24


def _as_int(value, name: str) -> int:
    """Return ``value`` as a Python int; bools and non-integers raise TypeError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def _check_num_layers(num_layers) -> int:
    num_layers = _as_int(num_layers, "num_layers")
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2 (layer N is never a candidate), got {num_layers}")
    return num_layers


def bucket_ranges(num_layers: int, n_buckets: int = DEFAULT_N_BUCKETS) -> list[tuple[int, int]]:
    """Inclusive 1-based layer ranges [(first, last), ...] of the ``n_buckets`` buckets of 1..num_layers."""
    num_layers = _check_num_layers(num_layers)
    n_buckets = _as_int(n_buckets, "n_buckets")
    if not 1 <= n_buckets <= num_layers:
        raise ValueError(f"n_buckets must be in 1..{num_layers} (num_layers), got {n_buckets}")
    base, extra = divmod(num_layers, n_buckets)
    ranges, first = [], 1
    for index in range(n_buckets):
        size = base + (1 if index < extra else 0)  # the first `extra` buckets take one more layer
        ranges.append((first, first + size - 1))
        first += size
    return ranges


def _bucket_candidates(num_layers: int, bucket, n_buckets, parity: str) -> list[int]:
    ranges = bucket_ranges(num_layers, n_buckets)
    bucket = _as_int(bucket, "bucket")
    if not 1 <= bucket <= len(ranges):
        raise ValueError(f"bucket must be in 1..{len(ranges)} (1-based, n_buckets={len(ranges)}), got {bucket}")
    first, last = ranges[bucket - 1]
    remainder = {"even": 0, "odd": 1}.get(parity)
    candidates = [j for j in range(first, min(last, num_layers - 1) + 1)
                  if remainder is None or j % 2 == remainder]
    if not candidates:
        kind = "" if parity == "all" else f"{parity} "
        raise ValueError(f"bucket={bucket} of n_buckets={len(ranges)} (layers {first}..{last}) has no {kind}layer "
                         f"below the final layer {num_layers}: pass another bucket= or explicit layers= "
                         f"(valid layers 1..{num_layers - 1})")
    return candidates


class LayerSelection(list):
    """Layer numbers checked by :func:`checked_layers` (THE rule) for a model of ``num_layers`` blocks (None: any
    depth, as for score's stacked layers): distinct ints in 1..N-1 in the given order (the order breaks JSD ties),
    or none. Read-only. A list, so it compares, prints and serialises as one.

    Only this module makes one (checked_layers; resolve_layers, default_layers and so resolve_settings): code that
    receives a LayerSelection knows it was checked and only asserts; the readout and score take one as it is.
    """
    __slots__ = ("num_layers",)

    def __init__(self, *args, **kwargs):
        raise TypeError("a LayerSelection is made by checked_layers(layers, num_layers), which checks the numbers")

    def _read_only(self, *args, **kwargs):
        raise TypeError("a LayerSelection is read-only: make another with checked_layers(layers, num_layers)")

    append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only

    def __reduce__(self):   # copies and pickles rebuild it as it is (it was checked)
        return _selection, (tuple(self), self.num_layers)


def _selection(numbers, num_layers: int | None) -> LayerSelection:
    selection = list.__new__(LayerSelection)
    list.extend(selection, numbers)
    selection.num_layers = num_layers
    return selection


def checked_layers(layers, num_layers: int | None = None, *, empty_ok: bool = False) -> LayerSelection:
    """THE rule for a list of layer numbers: a sequence of distinct ints in 1..num_layers-1 (>= 1 when num_layers
    is None), non-empty unless ``empty_ok``; TypeError / ValueError naming ``layers`` and the valid values.

    It runs once per value: where settings are resolved, or where a public call (``readout(images, layers)``,
    ``score`` / ``dola``) receives raw numbers. A LayerSelection already made for this depth (or for any depth
    when num_layers is None) is returned as it is.
    """
    if isinstance(layers, LayerSelection) and (num_layers is None or layers.num_layers == num_layers) \
            and (empty_ok or len(layers)):
        return layers
    return _selection(_check_numbers(layers, num_layers, empty_ok), num_layers)


def _check_numbers(layers, num_layers: int | None, empty_ok: bool) -> list[int]:
    valid = ">= 1" if num_layers is None else f"1..{num_layers - 1}"
    if hasattr(layers, "tolist") and not isinstance(layers, (str, bytes)):
        layers = layers.tolist()   # numpy / torch int arrays
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a sequence of ints {'in ' * (num_layers is not None)}{valid}, got {layers!r}")
    layers = list(layers)
    not_ints = [j for j in layers if isinstance(j, bool) or not hasattr(type(j), "__index__")]
    if not_ints:
        raise TypeError(f"layers must hold ints (valid layers are {valid}), got {type(not_ints[0]).__name__} "
                        f"{not_ints[0]!r}")
    numbers = [operator.index(j) for j in layers]
    if not numbers and not empty_ok:
        raise ValueError(f"layers must not be empty; valid layers are {valid}")
    top = float("inf") if num_layers is None else num_layers - 1
    bad = [j for j in numbers if not 1 <= j <= top]
    if bad:
        where = "" if num_layers is None else f" (num_layers={num_layers}; the final layer is never a candidate)"
        raise ValueError(f"layers {bad} out of range: valid layers are {valid}{where}")
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"layers must not contain duplicates, got {numbers}")
    return numbers


def resolve_layers(num_layers: int, layers=None, bucket=None, n_buckets: int = DEFAULT_N_BUCKETS,
                   parity: str = "even") -> LayerSelection:
    """Candidate layer numbers (a LayerSelection) from exactly one of explicit ``layers`` or a 1-based ``bucket``.

    Explicit layers keep their order (the order breaks JSD ties: earliest wins). A bucket gives its
    layers of the requested ``parity`` ("even" | "odd" | "all") in increasing order, N excluded.
    """
    num_layers = _check_num_layers(num_layers)
    if (layers is None) == (bucket is None):
        raise ValueError("pass exactly one of layers= (explicit layer numbers) or bucket= (1-based bucket index)")
    if parity not in PARITIES:
        raise ValueError(f"parity must be one of {PARITIES}, got {parity!r}")
    if layers is not None:
        return checked_layers(layers, num_layers)
    return _selection(_bucket_candidates(num_layers, bucket, n_buckets, parity), num_layers)


def default_candidates(num_layers: int, n_buckets: int = DEFAULT_N_BUCKETS) -> LayerSelection:
    """The design note's default candidates for ANY depth N >= 2: the even layers of the last of `n_buckets`
    buckets, N excluded ({18, 20, 22} for N=24). A shallow model whose last bucket has no even layer below N
    (N=6: bucket [5, 6]) takes all of that bucket's layers below N; with fewer layers than buckets the
    buckets are one layer each; the last resort is layer N-1 alone."""
    num_layers = _check_num_layers(num_layers)
    n_buckets = min(_as_int(n_buckets, "n_buckets"), num_layers)
    for parity in ("even", "all"):
        try:
            return resolve_layers(num_layers, bucket=n_buckets, n_buckets=n_buckets, parity=parity)
        except ValueError:
            continue
    return _selection([num_layers - 1], num_layers)


def default_layers(num_layers: int, mode: str, layers=None, bucket=None, n_buckets: int | None = None,
                   static_layer=None) -> tuple[LayerSelection, int | None]:
    """The ONE layer policy: (layers read per forward, static layer or None) for a DoLa mode (modes.MODES).

    Explicit ``layers`` or ``bucket`` (of ``n_buckets``, default 3) win. Without them the design note's
    default is the last of ``n_buckets`` buckets, even layers, N excluded ({18, 20, 22} for N=24).
    A fixed-layer mode ("static") reads only ``static_layer`` (default: the middle candidate, 20 for N=24);
    a mode that does not read by default ("off") reads no early layer unless ``layers`` / ``bucket`` are given
    (then their JSD is reported).
    """
    entry = mode_of(mode)
    n_buckets = DEFAULT_N_BUCKETS if n_buckets is None else n_buckets
    explicit = layers is not None or bucket is not None
    if layers is not None and bucket is not None:
        raise ValueError("pass at most one of layers= (explicit layer numbers) or bucket= (1-based bucket index)")
    if static_layer is not None and not entry.fixed_layer:
        fixed = " or ".join(f"mode={name!r}" for name, m in MODES.items() if m.fixed_layer)
        raise ValueError(f"static_layer is only used with {fixed}, got mode={mode!r}")
    if entry.fixed_layer and static_layer is not None:
        num_layers, static_layer = _check_num_layers(num_layers), _as_int(static_layer, "static_layer")
        if not 1 <= static_layer <= num_layers - 1:  # named here: resolve_layers would call it "layers"
            raise ValueError(f"static_layer {static_layer} out of range: valid layers are "
                             f"1..{num_layers - 1} (num_layers={num_layers}; the final layer is never a candidate)")
        return _selection([static_layer], num_layers), static_layer
    if not entry.reads_by_default and not explicit:
        candidates = _selection((), num_layers)  # a mode that reads no early layer by default ("off")
    elif explicit:
        candidates = resolve_layers(num_layers, layers=layers, bucket=bucket, n_buckets=n_buckets)
    else:
        candidates = default_candidates(num_layers, n_buckets)
    if entry.fixed_layer:
        middle = candidates[len(candidates) // 2]
        return _selection([middle], num_layers), middle
    return candidates, None
