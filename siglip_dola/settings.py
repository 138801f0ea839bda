"""DoLa settings: ONE resolution of (explicit flags / arguments) > (a calibration) > (the design note's defaults).

    settings = resolve_settings(num_layers, calibration="embedded", alpha=0.2)   # -> DoLaSettings
    settings.to_json()  # {"mode", "layers", "static_layer", "alpha", "contrast_weight", "bucket", "n_buckets",
                        #  "sources": {"mode", "layers", "alpha", "contrast_weight"} -> "flag" | "calibration" | "default",
                        #  "calibration": "embedded" | "/path/calib.json" | None}

A calibration is a JSON file written by ``siglip-dola calibrate``, the name ``"embedded"`` (the shipped
calibration of the embedded model: classification, or retrieval for ``task="zeroshot_retrieval"``), or a
report dict. ``"none"`` asks for no calibration. The calibration's ``choice`` applies; when a flag picks
another mode, that mode's entry of the calibration's ``best`` applies (else the defaults). The layer
specification (layers / bucket / n_buckets / static_layer) comes as one unit from the first source that
gives any of it. Layer numbers come from :func:`siglip_dola.layers.default_layers`, the one layer policy.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from siglip_dola.layers import DEFAULT_N_BUCKETS, default_layers, resolve_layers
from siglip_dola.modes import BASELINE, DEFAULT, MODES, mode_of
from siglip_dola.scoring.checks import check_alpha, check_contrast_weight
from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL

EMBEDDED = "embedded"
NO_CALIBRATION = "none"
DEFAULTS = {"mode": DEFAULT, "alpha": 0.1, "contrast_weight": 1.0}  # the design note
LAYER_KEYS = ("layers", "bucket", "n_buckets", "static_layer")
_warned_uncalibrated = False  # the "DoLa is uncalibrated" line is printed once per process


@dataclass(frozen=True)
class DoLaSettings:
    """The DoLa configuration an output was made with, and where each value came from (see module docstring)."""
    mode: str
    layers: list[int]            # from resolve_settings: a LayerSelection (checked once, there)
    static_layer: int | None
    alpha: float
    contrast_weight: float
    bucket: int | None
    n_buckets: int | None
    sources: dict = field(default_factory=dict)
    calibration: str | None = None

    def to_json(self) -> dict:
        """The JSON object stored under "settings" in every output."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "layers": list(self.layers), "sources": dict(self.sources)}

    @classmethod
    def from_json(cls, data: dict) -> "DoLaSettings":
        """Inverse of :meth:`to_json` (e.g. an index manifest's stored settings)."""
        missing = [k for k in ("mode", "layers", "alpha") if k not in data]
        if missing:
            raise ValueError(f"settings {data!r} lack keys {missing}")
        return cls(mode=data["mode"], layers=list(data["layers"]), static_layer=data.get("static_layer"),
                   alpha=float(data["alpha"]), contrast_weight=float(data.get("contrast_weight", 1.0)),
                   bucket=data.get("bucket"), n_buckets=data.get("n_buckets"), sources=dict(data.get("sources", {})),
                   calibration=data.get("calibration"))

    def describe(self) -> str:
        """One line: 'dynamic, layers [18, 20, 22], alpha 0.1, lambda 1.0 (mode: default, ...)'."""
        layers = f"layer {self.static_layer}" if MODES[self.mode].fixed_layer else f"layers {self.layers}"
        where = ", ".join(f"{k}: {v}" for k, v in self.sources.items())
        return f"DoLa {self.mode}, {layers}, alpha {self.alpha}, lambda {self.contrast_weight} ({where})"


def calibration_path(calibration, task: str = CLASSIFICATION) -> Path:
    """The file a calibration name or path refers to; "embedded" -> the shipped file for `task`."""
    if str(calibration) == EMBEDDED:
        from siglip_dola.loading.embedded import EMBEDDED_CALIBRATION, EMBEDDED_RETRIEVAL_CALIBRATION
        return EMBEDDED_RETRIEVAL_CALIBRATION if task == RETRIEVAL else EMBEDDED_CALIBRATION
    return Path(calibration)


def read_calibration_file(calibration, task: str = CLASSIFICATION) -> tuple[str, dict]:
    """(name recorded in settings, report dict) for a path, "embedded" or a report dict; clear errors."""
    if isinstance(calibration, dict):
        return str(calibration.get("path") or "<calibration dict>"), calibration
    path = calibration_path(calibration, task)
    if not path.is_file():
        raise FileNotFoundError(f"calibration={str(calibration)!r}: no such file; give a JSON written by "
                                f"`siglip-dola calibrate`, '{EMBEDDED}' (the shipped calibration of the embedded "
                                f"model) or '{NO_CALIBRATION}'")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"calibration={str(calibration)!r} is not a calibration JSON ({err})") from None
    if not isinstance(report, dict) or not isinstance(report.get("choice"), dict) or "mode" not in report["choice"]:
        raise ValueError(f"calibration={str(calibration)!r} needs a 'choice' object with a 'mode' key "
                         "(write it with `siglip-dola calibrate`)")
    return (EMBEDDED if str(calibration) == EMBEDDED else str(path)), report


def _choice_for(report: dict, mode: str | None) -> dict:
    """The calibration's choice, or its best point of `mode` when a flag asks for another mode ({} if none)."""
    choice = report["choice"]
    if mode is None or mode == choice.get("mode"):
        return choice
    return (report.get("best") or {}).get(mode, {})


def _flags(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def resolve_settings(num_layers: int, *, mode=None, layers=None, bucket=None, n_buckets=None, static_layer=None,
                     alpha=None, contrast_weight=None, calibration=None, model_id: str | None = None,
                     task: str = CLASSIFICATION, inherited: DoLaSettings | None = None,
                     warn: bool = True) -> DoLaSettings:
    """DoLaSettings from flags (non-None arguments) > calibration (path, "embedded", dict) > `inherited` > defaults.

    `inherited` (e.g. an index's stored settings) stands in for a calibration when none is given and keeps
    its recorded sources. `model_id` is checked against the calibration's "model". With no calibration,
    prints one line on stderr (once per process) that DoLa is uncalibrated, unless the mode is "off".
    """
    flags = _flags(mode=mode, layers=layers, bucket=bucket, n_buckets=n_buckets, static_layer=static_layer,
                   alpha=alpha, contrast_weight=contrast_weight)
    name, base, base_sources, inherits = None, {}, {}, False
    if calibration is not None and str(calibration) != NO_CALIBRATION:
        name, report = read_calibration_file(calibration, task)
        if model_id is not None and report.get("model") not in (None, model_id):
            raise ValueError(f"calibration {name or '<dict>'!r} was made for model {report['model']!r}, not "
                             f"{model_id!r}; run `siglip-dola calibrate {_model_flags(model_id)} ...` or pass "
                             f"calibration={NO_CALIBRATION!r}")
        base = {k: v for k, v in _choice_for(report, flags.get("mode")).items() if v is not None}
        base_sources = dict.fromkeys(("mode", "layers", "alpha", "contrast_weight"), "calibration")
    elif inherited is not None and str(calibration) != NO_CALIBRATION:
        name = inherited.calibration
        base = {k: v for k, v in inherited.to_json().items() if v is not None and k not in ("sources", "calibration")}
        if MODES[inherited.mode].fixed_layer:
            base.pop("layers", None)  # static_layer says it all
        elif inherited.bucket is not None:
            base.pop("layers", None)  # the bucket regenerates them
        base_sources, inherits = dict(inherited.sources), True
    values, sources = {}, {}
    for key in ("mode", "alpha", "contrast_weight"):
        if key in flags:
            values[key], sources[key] = flags[key], "flag"
        elif key in base:
            values[key], sources[key] = base[key], base_sources.get(key, "calibration")
        else:
            values[key], sources[key] = DEFAULTS[key], "default"
    entry = mode_of(values["mode"])   # ValueError naming the valid modes
    spec, sources["layers"] = _layer_spec(flags, base, base_sources, values["mode"], inherits)
    try:
        read, static = default_layers(num_layers, values["mode"], spec.get("layers"), spec.get("bucket"),
                                      spec.get("n_buckets"), spec.get("static_layer"))
    except ValueError as err:
        if sources["layers"] == "flag":
            raise
        raise ValueError(_not_for_this_model(spec, sources["layers"], name, num_layers)) from err
    bucket_of, n_buckets_of = None, None  # recorded when the layers are a bucket's (even layers, N excluded)
    if not entry.fixed_layer and spec.get("layers") is None and (entry.reads_by_default or "bucket" in spec):
        n_buckets_of = spec.get("n_buckets") or DEFAULT_N_BUCKETS
        bucket_of = spec.get("bucket") or n_buckets_of  # default: the last bucket
        if not _bucket_gives(num_layers, bucket_of, n_buckets_of, read):  # a shallow model's default: the layers say it
            bucket_of, n_buckets_of = None, None
    settings = DoLaSettings(mode=values["mode"], layers=read, static_layer=static, alpha=check_alpha(values["alpha"]),
                            contrast_weight=check_contrast_weight(values["contrast_weight"]), bucket=bucket_of,
                            n_buckets=n_buckets_of, sources=sources, calibration=name)
    if warn and name is None and settings.mode != BASELINE and "default" in (sources["mode"], sources["layers"],
                                                                           sources["alpha"]):
        warn_uncalibrated(model_id, settings)
    return settings


def _bucket_gives(num_layers: int, bucket: int, n_buckets: int, layers: list[int]) -> bool:
    try:
        return resolve_layers(num_layers, bucket=bucket, n_buckets=n_buckets) == list(layers)
    except ValueError:
        return False


def _not_for_this_model(spec: dict, source: str, name: str | None, num_layers: int) -> str:
    """The error for layer settings that did not come from a flag: it names where they came from (a calibration
    file, an index), in words that are no flag the user did not pass."""
    words = {"layers": "layers", "bucket": "bucket", "n_buckets": "of buckets", "static_layer": "static layer"}
    shown = ", ".join(f"{words[k]} {v}" for k, v in spec.items()) or "the defaults"
    origin = f"calibration {name!r}" if source == "calibration" and name else f"the {source} settings"
    return (f"the layer settings of {origin} ({shown}) do not fit this model of {num_layers} layers (candidates "
            f"1..{num_layers - 1}): they were made for another model; recalibrate for this one, or pass "
            f"calibration='none' or explicit layers=")


def _layer_spec(flags: dict, base: dict, base_sources: dict, mode: str, inherits: bool) -> tuple[dict, str]:
    """(layers / bucket / n_buckets / static_layer as one unit, its source). Inherited candidate layers (an
    index's) stay the candidates when a flag picks another mode: static then defaults to their middle one."""
    if any(k in flags for k in LAYER_KEYS):
        return {k: flags[k] for k in LAYER_KEYS if k in flags}, "flag"
    if not inherits and "mode" in flags and flags["mode"] != base.get("mode", flags["mode"]):
        return {}, "default"  # another mode than the calibration's, with no best entry for it
    spec = {k: base[k] for k in LAYER_KEYS if k in base}
    if not MODES[mode].reads_by_default and "bucket" not in base and "layers" not in base:
        spec = {}
    if not MODES[mode].fixed_layer:
        spec.pop("static_layer", None)
    if spec:
        return spec, base_sources.get("layers", "calibration")
    return {}, "default"


def _model_flags(model_id: str) -> str:
    from siglip_dola.loading.borrowed import cli_flags   # lazily: settings stays free of model loading

    return cli_flags(model_id)


def warn_uncalibrated(model_id: str | None, settings: DoLaSettings) -> None:
    """One stderr line per process: DoLa runs on uncalibrated defaults; name the command that fixes it."""
    global _warned_uncalibrated
    if _warned_uncalibrated:
        return
    _warned_uncalibrated = True
    command = "siglip-dola calibrate" + (f" {_model_flags(model_id)}" if model_id and model_id != EMBEDDED else "")
    print(f"siglip-dola: DoLa is uncalibrated for {model_id or 'this model'} ({settings.describe()}); run "
          f"`{command} --dataset VAL_DATA --out calib.json`, then pass calibration='calib.json' "
          "(`--calibration calib.json` on the command line)", file=sys.stderr)


def settings_for_model(model, calibration=None, task: str = CLASSIFICATION, inherited=None,
                       **flags) -> DoLaSettings:
    """resolve_settings for a LoadedModel: its default calibration (the embedded model's shipped one) applies
    when `calibration` is None and nothing is inherited."""
    if calibration is None and inherited is None:
        calibration = getattr(model, "calibration", None)
    return resolve_settings(model.readout.num_layers, calibration=calibration, model_id=model.model_id, task=task,
                            inherited=inherited, **flags)
