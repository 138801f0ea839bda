"""`siglip-dola classify` and `siglip-dola rerank`: zero-shot classification / reranking of image files with DoLa."""
from __future__ import annotations

import json
import sys

from siglip_dola.cli import add_decode_argument, subcommand
from siglip_dola.cli.lists import split_list, typed_list
from siglip_dola.cli.model_flags import add_model_arguments, load_model
from siglip_dola.modes import MODES



def parse_layers(text: str) -> list[int]:
    """'18,20,22' -> [18, 20, 22] (argparse type)."""
    return list(typed_list(int, "--layers", "18,20,22")(text))


def read_label_list(labels: str | None, labels_file: str | None, option: str = "--labels") -> list[str]:
    """Labels from 'cat,dog' (quoted like CSV: '"red, circle",dog') or a UTF-8 file (one per line); empty, blank or duplicate entries -> ValueError."""
    from siglip_dola.text_bank.bank import validate_labels
    from siglip_dola.text_bank.files import read_labels_file

    if labels_file is not None:
        return read_labels_file(labels_file)
    items = split_list(labels or "", option, '"cat,dog" (or \'"red, circle",dog\')', keep_blank=True)
    return validate_labels(items, source=option)


CALIBRATION_HELP = ("calibration: a JSON from `siglip-dola calibrate`, 'embedded' (the embedded model's shipped one) "
                    "or 'none'; default: the model's own (the shipped one for the embedded model), else the design "
                    "note's defaults. Explicit flags win over it")


def add_settings_arguments(parser, bucket: bool = True,
                           mode_help: str = "DoLa mode (default: the calibration's, else dynamic)") -> None:
    """--calibration, --mode, --alpha, --contrast-weight, --layers / --bucket, --n-buckets, --static-layer.

    Their defaults are None ("not given"): siglip_dola.settings fills them from the calibration or the defaults."""
    parser.add_argument("--calibration", default=None, metavar="FILE|embedded|none", help=CALIBRATION_HELP)
    parser.add_argument("--mode", choices=list(MODES), default=None,
                        help=mode_help + ": " + "; ".join(f"{name}: {m.help}" for name, m in MODES.items()))
    parser.add_argument("--alpha", type=float, default=None,
                        help="head constraint: keep q_N >= alpha * max q_N (default: the calibration's, else 0.1)")
    parser.add_argument("--contrast-weight", type=float, default=None, metavar="LAMBDA",
                        help="lambda of log q_N - lambda * log q_M (default: the calibration's, else 1; 0 = q_N on "
                             "the head set)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--layers", type=parse_layers, default=None, help="candidate layers, e.g. 18,20,22")
    if bucket:
        group.add_argument("--bucket", type=int, default=None, help="1-based bucket (default: the last)")
        parser.add_argument("--n-buckets", type=int, default=None, help="number of layer buckets (default 3)")
    parser.add_argument("--static-layer", type=int, default=None, help="premature layer for --mode static")


def settings_flags(args) -> dict:
    """The DoLa settings flags of parsed `args` (None = not given), as resolve_settings keywords."""
    return {"mode": args.mode, "alpha": args.alpha, "contrast_weight": args.contrast_weight, "layers": args.layers,
            "bucket": getattr(args, "bucket", None), "n_buckets": getattr(args, "n_buckets", None),
            "static_layer": args.static_layer}


def _add_scorer_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
    add_model_arguments(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_settings_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    add_decode_argument(parser)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the forward from CUDA graphs, one per batch shape (CUDA only; faster at small batches)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars of long image and text encodings (default: shown)")


def _classify_arguments(parser) -> None:
    _add_scorer_arguments(parser)
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog"; quote one that holds a '
                        'comma as in CSV: \'"red, circle",dog\'')
    labels.add_argument("--labels-file", help="UTF-8 text file, one class name per line")
    parser.add_argument("--bank", default=None,
                        help="precomputed text bank (.npy / .safetensors); labels from the file or --labels")
    parser.add_argument("--templates", nargs="+", default=["{}"],
                        help='prompt templates with {} for the class name (default: "{}")')
    parser.add_argument("--top-k", type=int, default=5)


def _rerank_arguments(parser) -> None:
    _add_scorer_arguments(parser)
    texts = parser.add_mutually_exclusive_group(required=True)
    texts.add_argument("--texts", help='image -> texts: comma-separated candidate texts (quoted like CSV)')
    texts.add_argument("--texts-file", help="image -> texts: UTF-8 file, one candidate text per line")
    texts.add_argument("--query", action="append", help="text -> images: rank the images for this text (repeatable)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the best K (default: all)")


def _build_scorer(args):
    """(LoadedModel, DoLaSigLIP) from the parsed scorer options."""
    from siglip_dola.scorer import DoLaSigLIP
    from siglip_dola.settings import settings_for_model

    model = load_model(args, args.device)
    settings = settings_for_model(model, args.calibration, **settings_flags(args))   # the one resolution
    return model, DoLaSigLIP(model, settings=settings, batch_size=args.batch_size, cuda_graphs=args.cuda_graphs,
                             decode=args.decode)


def _run_batches(scorer, paths, bank, top_k, key, progress: bool = True) -> tuple[list, list]:
    """Classify all paths with a progress bar (stderr) when there are more than one batch of images."""
    from tqdm import tqdm

    results, skipped = [], []
    with tqdm(total=len(paths), unit="img", disable=len(paths) <= scorer.batch_size or not progress,
              file=sys.stderr) as bar:
        for batch_results, batch_skipped in scorer.iter_classify(paths, bank, top_k, key=key):
            results.extend(batch_results)
            skipped.extend({"path": str(p), "error": e} for p, e in batch_skipped)
            bar.update(len(batch_results) + len(batch_skipped))
    if skipped and not results:
        from siglip_dola.failures import all_failed_message

        raise ValueError(all_failed_message("images", skipped))
    return results, skipped


def _check_queries(queries: list[str]) -> list[str]:
    queries = [q.strip() for q in queries]
    if not all(queries):
        raise ValueError("--query must be a non-empty text")
    return queries


def _embed_all(scorer, paths, progress: bool = True) -> tuple[list, object, object, list]:
    """(ids, z_final [n, D], z_layers [J, n, D] | None, skipped) for all paths, with a progress bar."""
    import torch
    from tqdm import tqdm

    ids, finals, stacks, skipped = [], [], [], []
    with tqdm(total=len(paths), unit="img", disable=len(paths) <= scorer.batch_size or not progress,
              file=sys.stderr) as bar:
        for batch_ids, z_final, z_layers, batch_skipped in scorer.iter_embed(paths):
            skipped.extend({"path": str(p), "error": e} for p, e in batch_skipped)
            if z_final is not None:
                ids.extend(batch_ids)
                finals.append(z_final)
                stacks.append(z_layers)
            bar.update(len(batch_ids) + len(batch_skipped))
    if not finals:
        from siglip_dola.failures import all_failed_message

        raise ValueError(all_failed_message("images", skipped))
    z_layers = torch.cat(stacks, dim=1) if stacks[0] is not None else None  # (J, n, D)
    return ids, torch.cat(finals), z_layers, skipped


def _print_table(rows: list[dict]) -> None:
    """Rows of the output vocabulary as text; the item column is as wide as its longest entry."""
    from siglip_dola.cli import safe_text

    for row in rows:
        layer = row["premature_layer"]
        print(f"{safe_text(row['query'])}  (premature layer: {'-' if layer is None else layer})")
        width = max((len(safe_text(hit["item"])) for hit in row["hits"]), default=0)
        for hit in row["hits"]:
            print(f"  {hit['rank']:>3}. {safe_text(hit['item']):<{width}}  dola={hit['score']:.4f}  "
                  f"baseline={hit['baseline_score']:.4f}")


def _emit(args, scorer, results: list[dict], skipped: list[dict], items: str, key: str, head: str) -> int:
    """Print `results` (library rows) in the shared vocabulary (siglip_dola/output.py); skipped -> stderr."""
    from siglip_dola.cli import report_skipped
    from siglip_dola.output import results_json, scorer_row

    item_type = "path" if key == "image" else key
    rows = [scorer_row(r, head, items, key, item_type) for r in results]
    if args.json:
        print(json.dumps({"settings": scorer.settings.to_json(), **results_json(rows, skipped)}, indent=2))
    else:
        _print_table(rows)
    return report_skipped(skipped, getattr(args, "_prog", "siglip-dola"))


def _classify_labels(args) -> list[str] | None:
    """Labels from --labels / --labels-file (validated before the model loads); None with --bank alone."""
    if args.labels is None and args.labels_file is None:
        if args.bank is None:
            raise ValueError("give the classes with --labels \"cat,dog\", --labels-file FILE or --bank FILE")
        return None
    return read_label_list(args.labels, args.labels_file)


def _classify_bank(args, model, labels):
    """TextBank from --bank (labels from the file or `labels`) or from labels x --templates."""
    from siglip_dola.text_bank.build import build_text_bank
    from siglip_dola.text_bank.files import load_text_bank

    if args.bank is not None:
        return load_text_bank(args.bank, labels=labels)
    return build_text_bank(model, labels, templates=tuple(args.templates), progress=args.progress)


@subcommand("classify", help="Zero-shot classify images with DoLa.")
def classify_command(args) -> int:
    """Classify IMAGES against --labels / --bank; prints a table or --json; exit 1 when some files were skipped."""
    from siglip_dola.data.images import expand_image_paths

    labels = _classify_labels(args)
    paths = expand_image_paths(args.images)
    model, scorer = _build_scorer(args)
    bank = _classify_bank(args, model, labels)
    results, skipped = _run_batches(scorer, paths, bank, args.top_k, key="label", progress=args.progress)
    return _emit(args, scorer, results, skipped, "predictions", "label", "image")


@subcommand("rerank", help="Rerank texts for each image (--texts) or images for a text (--query) with DoLa.")
def rerank_command(args) -> int:
    """Image -> texts (--texts/--texts-file) or text -> images (--query); exit 1 when some files were skipped."""
    from siglip_dola.data.images import expand_image_paths
    from siglip_dola.text_bank.build import build_text_bank

    paths = expand_image_paths(args.images)
    if args.query:
        queries = _check_queries(args.query)
        model, scorer = _build_scorer(args)
        ids, z_final, z_layers, skipped = _embed_all(scorer, paths, args.progress)
        if len(ids) == 1:
            import warnings
            warnings.warn("only one image to rank: it always scores 1.0; ranking needs at least 2 candidates")
        results = scorer.rerank_images(queries, image_embeds=(z_final, z_layers), ids=ids, top_k=args.top_k)
        return _emit(args, scorer, results, skipped, "ranking", "image", "text")
    texts = read_label_list(args.texts, args.texts_file, option="--texts")
    model, scorer = _build_scorer(args)
    bank = build_text_bank(model, texts, progress=args.progress)
    results, skipped = _run_batches(scorer, paths, bank, args.top_k, key="text", progress=args.progress)
    return _emit(args, scorer, results, skipped, "predictions", "text", "image")


classify_command.add_arguments = _classify_arguments
rerank_command.add_arguments = _rerank_arguments
