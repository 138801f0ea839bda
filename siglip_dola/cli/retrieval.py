"""`siglip-dola index build|add` and `siglip-dola search`: the persisted image index and DoLa-reranked search."""
from __future__ import annotations

import json

from siglip_dola.cli import add_decode_argument, subcommand
from siglip_dola.cli.classify import add_settings_arguments, settings_flags


def _model_arguments(parser, default_help: str) -> None:
    parser.add_argument("--model", default=None, help=f"model name, hub id or local path ({default_help})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: this rank's GPU, else cpu)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=4096, help="images per segment (the resume unit)")
    add_decode_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _index_arguments(parser) -> None:
    from siglip_dola.cli import EXIT_STATUS_HELP

    sub = parser.add_subparsers(dest="index_command", metavar="{build,add,verify}", required=True)
    build = sub.add_parser("build", help="embed images once and write a new index", epilog=EXIT_STATUS_HELP)
    build.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
    build.add_argument("--out", required=True, help="index folder to create (an existing index needs --overwrite)")
    build.add_argument("--overwrite", action="store_true",
                       help="replace an existing index at --out (to extend one, use `index add`)")
    _model_arguments(build, "default: the embedded model")
    _store_arguments(build)
    add_settings_arguments(build)  # the settings are stored in the manifest, with the layers they read
    add = sub.add_parser("add", help="add images not indexed yet to an existing index", epilog=EXIT_STATUS_HELP)
    add.add_argument("index", help="index folder")
    add.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
    add.add_argument("--image-root", default=None,
                     help="where the indexed images are now, if their folder moved (default: the recorded root)")
    _model_arguments(add, "default: the index's model")
    verify = sub.add_parser("verify", help="full integrity check: re-hash every file of an index",
                            epilog="exit status: 0 intact; 2 a file is missing or corrupt (named on stderr)")
    verify.add_argument("index", help="index folder")
    add.add_argument("--calibration", default=None, metavar="FILE|embedded|none",
                     help="check that the index stores the layers this calibration needs")


def _store_arguments(build) -> None:
    from siglip_dola.index_options import DEFAULT_LAYER_STORE, StoreOptions

    build.add_argument("--layer-store", default=DEFAULT_LAYER_STORE, metavar="fp16|int8|int4|pqM|FINAL+LAYERS",
                       help=f"how the layer vectors are stored (default: {DEFAULT_LAYER_STORE}; see docs/retrieval.md)")
    build.add_argument("--index-memory", default=StoreOptions.index_memory, metavar="SIZE",
                       help="RAM budget of the first stage, e.g. 4G: picks the FAISS index (exact fp16 below ~1M "
                            "images, IVF + PQ above) (default: %(default)s)")
    build.add_argument("--index-factory", default=None, metavar="STRING",
                       help="FAISS index_factory string for the first stage (overrides --index-memory), e.g. IVF4096,PQ64")
    build.add_argument("--target-recall", type=float, default=StoreOptions.target_recall,
                       help="recall of the first stage against exact search that nprobe is tuned to (default: %(default)s)")
    build.add_argument("--recall-k", type=int, default=StoreOptions.rerank_k,
                       help="k of the recall target: the rerank-k searches will use (default: %(default)s)")


def _store_options(args):
    from siglip_dola.index_options import StoreOptions

    return StoreOptions(layer_store=args.layer_store, index_factory=args.index_factory, index_memory=args.index_memory,
                        target_recall=args.target_recall, rerank_k=args.recall_k)


def _load_model(name, device):
    from siglip_dola.distributed import local_device
    from siglip_dola.loading import load

    return load(name, device=device or local_device())


def _print_manifest(manifest, skipped: list, prog: str) -> int:
    """Summary on stdout, this run's skipped files on stderr (rank 0 only); the exit code says if any."""
    from siglip_dola.cli import EXIT_OK, EXIT_SKIPPED, report_skipped, safe_text
    from siglip_dola.distributed import is_main_process

    if not is_main_process():
        return EXIT_SKIPPED if skipped else EXIT_OK
    from siglip_dola.failures import count_of

    print(f"index: {count_of(manifest.count, 'image')}, layers {manifest.layers}, model {manifest.model_id}, "
          f"{len(skipped)} skipped, checksum {manifest.checksum[:16]}, image root {safe_text(manifest.image_root)}")
    stage = manifest.first_stage or {}
    params = f", {stage['search_params']}" if stage.get("search_params") else ""
    recall = f", recall@{stage['k']} {stage['recall']:.3f} on {stage['tune_queries']} held-out vectors" if params else ""
    print(f"layer store: {manifest.layer_store}; first stage: {stage.get('factory', 'SQfp16 (exact)')}{params}{recall}")
    if manifest.settings:
        from siglip_dola.settings import DoLaSettings
        print(f"settings: {DoLaSettings.from_json(manifest.settings).describe()}")
    return report_skipped(skipped, prog)


def _run_index(args):
    """(manifest, [(path, error)] skipped among this run's inputs)."""
    from siglip_dola.retrieval import add_to_index, build_index, storage, verify_index

    if args.index_command == "verify":
        return verify_index(args.index), []
    if args.index_command == "build":
        model = _load_model(args.model, args.device)
        flags = settings_flags(args)
        manifest = build_index(args.images, args.out, model, layers=flags.pop("layers"), bucket=flags.pop("bucket"),
                               batch_size=args.batch_size, chunk_size=args.chunk_size, progress=not args.quiet,
                               overwrite=args.overwrite, calibration=args.calibration,
                               store_options=_store_options(args), decode=args.decode, **flags)
        return manifest, manifest.skipped
    from siglip_dola.data.images import expand_image_paths

    inputs = {str(p.resolve()) for p in expand_image_paths(args.images)}
    model = _load_model(args.model or storage.read_manifest(args.index).model_id, args.device)
    manifest = add_to_index(args.index, args.images, model, batch_size=args.batch_size,
                            chunk_size=args.chunk_size, progress=not args.quiet, image_root=args.image_root,
                            calibration=args.calibration, decode=args.decode)
    return manifest, [s for s in manifest.skipped if s[0] in inputs]


@subcommand("index", help="Build, extend or verify a persisted image index (run under torchrun to shard the embedding).")
def index_command(args) -> int:
    from siglip_dola.distributed import distributed_session

    with distributed_session():
        manifest, skipped = _run_index(args)
        if args.index_command == "verify":
            from siglip_dola.failures import count_of

            print(f"index {args.index}: intact ({count_of(manifest.count, 'image')}, "
                  f"{count_of(len(manifest.segments), 'segment')}, "
                  f"layer store {manifest.layer_store}, FAISS file {manifest.faiss_file})")
            return 0
        return _print_manifest(manifest, skipped, getattr(args, "_prog", "siglip-dola index"))


index_command.add_arguments = _index_arguments


def _search_arguments(parser) -> None:
    parser.add_argument("index", nargs="?", help="index folder (text -> images)")
    parser.add_argument("query", nargs="?", help='query text, e.g. "a red car"')
    parser.add_argument("--captions", default=None, help="caption file (.txt one per line, or .csv) for image -> captions")
    parser.add_argument("--image", default=None, help="query image for --captions")
    parser.add_argument("--model", default=None, help="model (default: the index's model; with --captions: embedded)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=100, help="first-stage candidates DoLa reranks")
    add_settings_arguments(parser)  # default: the index's stored settings; --bucket / --n-buckets: --captions only
    parser.add_argument("--image-root", default=None,
                        help="where the index's images are now, if their folder moved (default: the recorded root)")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every file of the index before searching (a full integrity check)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_search(args):
    from siglip_dola.loading import load
    from siglip_dola.retrieval import RerankConfig, open_index, search, search_captions
    from siglip_dola.retrieval.storage import read_manifest

    config = RerankConfig(top_k=args.top_k, rerank_k=args.rerank_k, mode=args.mode, alpha=args.alpha,
                          static_layer=args.static_layer, layers=args.layers, contrast_weight=args.contrast_weight,
                          calibration=args.calibration)
    if args.captions is not None:
        if args.image is None or args.index is not None:
            raise ValueError("--captions needs --image IMAGE and no INDEX/QUERY: "
                             "siglip-dola search --captions captions.txt --image img.png")
        for flag in ("image_root", "verify"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} applies to an index search, not --captions")
        if args.n_buckets is not None and args.bucket is None:
            raise ValueError("--n-buckets needs --bucket")
        return search_captions(load(args.model, device=args.device), args.image, args.captions, config,
                               bucket=args.bucket, n_buckets=args.n_buckets)
    if args.index is None or args.query is None or args.image is not None:
        raise ValueError('give INDEX and QUERY (siglip-dola search INDEX "a red car"), '
                         "or --captions FILE --image IMAGE")
    if args.bucket is not None or args.n_buckets is not None:
        raise ValueError("--bucket / --n-buckets apply to --captions only; an index search uses its stored layers "
                         "(--layers subset)")
    model = load(args.model or read_manifest(args.index).model_id, device=args.device)
    index = open_index(args.index, model=model, verify=args.verify, image_root=args.image_root)
    return search(index, args.query, model, config)


def _print_table(result) -> None:
    from siglip_dola.cli import safe_text

    key = result.item_key
    layer = "off" if result.premature_layer is None else result.premature_layer
    print(f"query: {safe_text(result.query)}    premature layer: {layer}")
    if not result.results:
        print("(no results)")
        return
    print(f"{'rank':>4}  {'score':>9}  {'baseline':>9}  {'1st':>5}  {key}")
    for rank, hit in enumerate(result.results, start=1):
        print(f"{rank:>4}  {hit.score:9.4f}  {hit.baseline_score:9.4f}  {hit.rank_baseline:>5}  {safe_text(hit.item)}")


@subcommand("search", help="Search an index with a text query (or captions with an image), DoLa-reranked.")
def search_command(args) -> int:
    from siglip_dola.output import results_json

    result = _run_search(args)
    if args.json:
        settings = None if result.settings is None else result.settings.to_json()
        print(json.dumps({"settings": settings, **results_json([result.to_json()], [])}, indent=2))
    else:
        _print_table(result)
    return 0


search_command.add_arguments = _search_arguments
