"""The documented JSON examples have the keys real output has (issue #26, 5): docs/output.md, docs/retrieval.md,
docs/viewer.md and docs/evaluation.md, checked against the commands run on the embedded model (keys, not values)."""
import json
import re
from pathlib import Path

import pytest

from siglip_dola.cli import main
from siglip_dola.modes import MODES

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _as_json(text: str):
    """A documented example with `...` placeholders as JSON: {...} -> {}, [...] -> [], ', ...' dropped, ... -> null."""
    text = text.replace("{...}", "{}").replace("[...]", "[]")
    text = re.sub(r",\s*\.\.\.(?=\s*[\]}])", "", text)
    return json.loads(text.replace("...", "null"))


def _examples(name: str) -> list:
    """Every ```json block and every inline `{"...}` example of a doc, parsed (spans that list key sets,
    `{"layer", "metrics"}`, are schema notation, not examples)."""
    text = (DOCS / name).read_text(encoding="utf-8")
    examples = [_as_json(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.S)]
    for span in re.findall(r"`(\{\".*?\})`", text, flags=re.S):
        try:
            examples.append(_as_json(span))
        except json.JSONDecodeError:
            assert re.search(r'"\w+", "', span), span  # a key-set notation, not a broken example
    return examples


def _keys_match(documented: dict, real: dict, extra_ok: tuple = ()) -> None:
    """Same keys (the real output may add `extra_ok`), recursively for nested dicts and the first list item."""
    assert set(documented) <= set(real) and set(real) - set(documented) <= set(extra_ok), (documented, real)
    for key, value in documented.items():
        if isinstance(value, dict) and value and isinstance(real.get(key), dict) and not key.isdigit() \
                and not all(k.isdigit() for k in value):
            _keys_match(value, real[key])
        elif isinstance(value, list) and value and isinstance(value[0], dict) and real.get(key):
            _keys_match(value[0], real[key][0])


def run_json(capsys, *argv) -> dict:
    main([str(a) for a in argv])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    assert main(["shapes", "export", str(root / "img"), "--n", "3"]) == 0
    (root / "img" / "broken.png").write_bytes(b"not a png")
    assert main(["index", "build", str(root / "img"), "--out", str(root / "idx"), "--quiet"]) == 1  # broken.png
    return root


def test_output_md_example_has_the_keys_of_classify_json(files, capsys):
    (documented,) = _examples("output.md")
    real = run_json(capsys, "classify", files / "img", "--labels", "red circle,blue square", "--json")
    _keys_match(documented, real, extra_ok=("settings",))
    assert real["results"][0]["jsd"]  # values, as the doc says (not {})


def test_retrieval_md_example_has_the_keys_of_search_json(files, capsys):
    documented = [e for e in _examples("retrieval.md") if "results" in e]
    assert documented
    real = run_json(capsys, "search", files / "idx", "a red circle", "--json")
    for example in documented:
        _keys_match(example, real)
    assert real["results"][0]["jsd"]


def test_viewer_md_api_example_has_the_keys_of_the_api(files):
    from siglip_dola.loading import load
    from siglip_dola.viewer.service import SearchService

    (documented,) = [e for e in _examples("viewer.md") if "latency_ms" in e]
    service = SearchService(files / "idx", load(None))
    _keys_match(documented, service.search_text("a red circle", service.parse()))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_docs")
    argv = ["eval", "--dataset", "shapes", "--limit", "8", "--no-progress", "--workers", "0", "--n-resamples", "100",
            "--out", str(root / "r.json"), "--predictions", str(root / "p.jsonl")]
    assert main(argv) == 0
    first = json.loads((root / "p.jsonl").read_text().splitlines()[0])
    return json.loads((root / "r.json").read_text()), first


def test_evaluation_md_prediction_example_has_the_keys_of_eval_predictions(evaluated):
    _, real = evaluated
    (documented,) = [e for e in _examples("evaluation.md") if "label_index" in e]
    _keys_match({k: v for k, v in documented.items() if k != "modes"}, real, extra_ok=("modes",))
    assert set(documented["modes"]) <= set(real["modes"]) == set(MODES)   # the example shows some of the modes
    for mode in documented["modes"]:
        assert set(documented["modes"][mode]) == set(real["modes"][mode]), mode


def test_evaluation_md_result_table_names_the_keys_of_eval_out(evaluated):
    result, _ = evaluated
    text = (DOCS / "evaluation.md").read_text(encoding="utf-8")
    table = text.split("## Result JSON schema", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.*?) \| (.*?) \|", table, flags=re.M)
    # keys the table marks "`study` only" are in study results, not in eval's (test_study checks those)
    rows = [key for key, description in rows if not description.startswith("`study` only")]
    documented = {name for row in rows for name in re.findall(r"`([\w.]+)`", row)}
    documented = {name.split(".")[0] for name in documented if name not in ("key",)}
    assert documented <= set(result) and set(result) - documented <= {"plots", "bank"}, (documented, set(result))


def test_evaluation_md_summary_line_is_the_shipped_results_line():
    from siglip_dola.evaluation.results import summary_line
    from siglip_dola.loading.embedded import EMBEDDED_RESULTS

    line = summary_line(json.loads(Path(EMBEDDED_RESULTS).read_text(encoding="utf-8")))
    assert f"`{line}`" in (DOCS / "evaluation.md").read_text(encoding="utf-8")
