"""Read eval's Result JSON and Predictions JSONL into the report's compact, columnar payload.

Columnar (one list per field, class names by index, probabilities rounded) keeps 10,000 rows to a few
MB of JSON that the page parses once. Outcome codes per DoLa mode compare its top-1 with off's:
0 both wrong, 1 fixed (off wrong, DoLa right), 2 broken (off right, DoLa wrong), 3 both right.
For retrieval, "right" means the top-1 item is a gold item.
"""
from __future__ import annotations

import json
from pathlib import Path

from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL
from siglip_dola.viewer.thumbnails import ThumbnailSource
from siglip_dola.modes import BASELINE

OUTCOMES = ("both wrong", "fixed", "broken", "both right")


def read_result(result) -> dict:
    """A Result JSON (path or dict), checked for the keys the report needs."""
    if not isinstance(result, dict):
        path = Path(result)
        if not path.is_file():
            raise FileNotFoundError(f"result JSON {str(path)!r} does not exist (write it with `siglip-dola eval --out`)")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"result JSON {str(path)!r} is not valid JSON: {err}") from None
    missing = [key for key in ("dataset", "model", "task", "split", "modes") if key not in result]
    if missing:
        raise ValueError(f"result JSON lacks {missing}: expected the output of `siglip-dola eval --out`")
    if result["task"] not in (CLASSIFICATION, RETRIEVAL):
        raise ValueError(f"result task must be {CLASSIFICATION!r} or {RETRIEVAL!r}, got {result['task']!r}")
    if BASELINE not in result["modes"]:
        raise ValueError(f"result JSON has modes {sorted(result['modes'])}; the report compares against 'off'")
    return result


def read_predictions(path) -> tuple[list[dict], list[str]]:
    """(records in file order, problems): a line that is not a JSON object is reported and skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions {str(path)!r} does not exist (write it with `siglip-dola eval "
                                "--predictions FILE.jsonl`)")
    records, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"line {number}: not JSON ({err.msg})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("modes"), dict) or BASELINE not in record["modes"]:
                problems.append(f"line {number}: not a prediction record (needs 'modes' with 'off')")
                continue
            records.append(record)
    if not records:
        raise ValueError(f"predictions {str(path)!r} hold no prediction records ({len(problems)} bad lines)")
    return records, problems


def dola_modes(result: dict, records: list[dict]) -> list[str]:
    """The non-off modes present in both files, the chosen mode first."""
    present = [m for m in result["modes"] if m != BASELINE and all(m in r["modes"] for r in records)]
    chosen = result.get("chosen_mode")
    return sorted(present, key=lambda m: (m != chosen, list(result["modes"]).index(m)))


def _outcome(off_right: bool, dola_right: bool) -> int:
    """0 both wrong, 1 fixed, 2 broken, 3 both right (the index into OUTCOMES)."""
    return 2 * bool(off_right) + bool(dola_right)


def _top(entries: list[dict], n: int = 3) -> list:
    """[[class index, prob], ...] of the first n entries."""
    return [[int(e["index"]), round(float(e["prob"]), 4)] for e in entries[:n]]


def _jsd_row(jsd: dict | None, layers: list[int]) -> list:
    jsd = jsd or {}
    return [None if str(j) not in jsd else round(float(jsd[str(j)]), 4) for j in layers]


def _classification(records: list[dict], modes: list[str], thumbs: ThumbnailSource) -> dict:
    classes: dict[int, str] = {}
    for record in records:
        classes[int(record["label_index"])] = str(record["label"])
        for mode in (BASELINE, *modes):
            for entry in record["modes"][mode].get("top5", []):
                classes.setdefault(int(entry["index"]), str(entry["label"]))
    labels = [int(r["label_index"]) for r in records]
    off_top1 = [int(r["modes"][BASELINE]["top5"][0]["index"]) for r in records]
    payload = {"task": "classification", "classes": {str(k): v for k, v in sorted(classes.items())},
               "id": [str(r["id"]) for r in records], "label": labels,
               "thumb": [thumbs(str(r["id"])) for r in records],
               BASELINE: {"top": [_top(r["modes"][BASELINE]["top5"]) for r in records],
                       "true_prob": [round(float(r["modes"][BASELINE]["true_prob"]), 4) for r in records]},
               "modes": {}}
    for mode in modes:
        preds = [r["modes"][mode] for r in records]
        layers = sorted({int(j) for p in preds for j in (p.get("jsd") or {})})
        payload["modes"][mode] = {
            "top": [_top(p["top5"]) for p in preds],
            "true_prob": [round(float(p["true_prob"]), 4) for p in preds],
            "layer": [p.get("premature_layer") for p in preds],
            "head": [p.get("head_set_size") for p in preds],
            "jsd_layers": layers, "jsd": [_jsd_row(p.get("jsd"), layers) for p in preds],
            "outcome": [_outcome(o == y, int(p["top5"][0]["index"]) == y)
                        for o, p, y in zip(off_top1, preds, labels)]}
    return payload


def _top_key(prediction: dict) -> str:
    keys = [k for k in prediction if k.startswith("top") and k[3:].isdigit()]
    if not keys:
        raise ValueError(f"retrieval prediction has no top<k> list, keys: {sorted(prediction)}")
    return keys[0]


def _retrieval(records: list[dict], modes: list[str], thumbs: ThumbnailSource) -> dict:
    gold = [[str(g) for g in r.get("gold", [])] for r in records]

    def ranking(prediction: dict) -> tuple[list[str], list[float]]:
        hits = prediction[_top_key(prediction)]
        return [str(h["id"]) for h in hits], [round(float(h.get("score", 0.0)), 4) for h in hits]

    def block(mode: str) -> dict:
        ranked = [ranking(r["modes"][mode]) for r in records]
        return {"top": [ids for ids, _ in ranked], "score": [scores for _, scores in ranked],
                "right": [bool(ids) and ids[0] in g for (ids, _), g in zip(ranked, gold)]}

    off = block(BASELINE)
    payload = {"task": "retrieval", "query": [str(r.get("query", "")) for r in records], "gold": gold,
               BASELINE: off, "modes": {}}
    for mode in modes:
        data = block(mode)
        data["layer"] = [r["modes"][mode].get("premature_layer") for r in records]
        data["outcome"] = [_outcome(o, d) for o, d in zip(off["right"], data["right"])]
        payload["modes"][mode] = data
    ids = {i for g in gold for i in g}
    for data in (off, *payload["modes"].values()):
        ids.update(i for top in data["top"] for i in top)
    payload["thumbs"] = {i: thumbs(i) for i in sorted(ids)}
    return payload


def _record_problem(record: dict, task: str, modes: list[str]) -> str | None:
    """Why `record` cannot be shown (a missing or mistyped field), or None."""
    try:
        if task == CLASSIFICATION:
            int(record["label_index"]), str(record["label"]), str(record["id"])
            for mode in (BASELINE, *modes):
                prediction = record["modes"][mode]
                float(prediction["true_prob"])
                if not prediction["top5"]:
                    raise ValueError(f"modes.{mode}.top5 is empty")
                for entry in prediction["top5"][:3]:
                    int(entry["index"]), float(entry["prob"]), str(entry["label"])
        else:
            list(record["gold"])
            for mode in (BASELINE, *modes):
                for hit in record["modes"][mode][_top_key(record["modes"][mode])]:
                    str(hit["id"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        return f"record {record.get('index', '?')}: left out, a field is missing or malformed ({type(err).__name__}: {err})"
    return None


def report_payload(result: dict, records: list[dict], thumbs: ThumbnailSource,
                   problems: list[str] | None = None) -> dict:
    """The JSON the page renders: rows of the task plus the DoLa modes it can compare with off.
    Records missing a field the report shows are left out and described in `problems`."""
    modes = dola_modes(result, records)
    if not modes:
        raise ValueError("predictions hold no DoLa mode (static or dynamic) next to 'off'; rerun eval with them")
    checked = [(r, _record_problem(r, result["task"], modes)) for r in records]
    if problems is not None:
        problems.extend(problem for _, problem in checked if problem)
    records = [r for r, problem in checked if problem is None]
    if not records:
        raise ValueError("no prediction record has the fields the report needs (see the Predictions JSONL contract)")
    build = _classification if result["task"] == CLASSIFICATION else _retrieval
    payload = build(records, modes, thumbs)
    payload["mode_order"] = modes
    payload["outcomes"] = list(OUTCOMES)
    return payload
