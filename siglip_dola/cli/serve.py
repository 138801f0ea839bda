"""`siglip-dola serve INDEX`: a local search page over a retrieval index (off and DoLa side by side)."""
from __future__ import annotations

import sys

from siglip_dola.cli import int_at_least, int_in_range, subcommand
from siglip_dola.cli.classify import add_settings_arguments

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _serve_arguments(parser) -> None:
    parser.add_argument("index", help="index folder (from `siglip-dola index build`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int_in_range(0, 65535), default=8000,
                        help="port, 0..65535 (default 8000; 0 = any free port)")
    parser.add_argument("--model", default=None, help="model (default: the index's model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--captions", default=None, help="caption file (.txt / .csv): enables image upload -> captions")
    parser.add_argument("--image-root", default=None, help="folder holding the indexed images if they moved (by file name)")
    parser.add_argument("--top-k", type=int_at_least(1), default=None, help="default k on the page (default: 10)")
    parser.add_argument("--rerank-k", type=int_at_least(1), default=None,
                        help="default rerank-k on the page (default: 100)")
    parser.add_argument("--max-k", type=int_at_least(1), default=100, help="largest k a request may ask for")
    parser.add_argument("--max-rerank-k", type=int_at_least(1), default=1000, help="largest rerank-k a request may ask for")
    # --bucket / --n-buckets pick among the index's stored layers
    add_settings_arguments(parser, mode_help="default DoLa mode of the page (default: the index's stored mode, "
                                             "else dynamic)")


@subcommand("serve", help="Serve a local search page and JSON API over a retrieval index (127.0.0.1 by default).")
def serve_command(args) -> int:
    from siglip_dola.loading import load
    from siglip_dola.retrieval import RerankConfig
    from siglip_dola.retrieval.storage import read_manifest
    from siglip_dola.viewer.app import bind, create_app, run, url_of
    from siglip_dola.viewer.service import Limits, SearchService

    top_k = 10 if args.top_k is None else args.top_k
    rerank_k = 100 if args.rerank_k is None else args.rerank_k
    if rerank_k < top_k or args.max_rerank_k < args.max_k:
        raise ValueError("--rerank-k must be >= --top-k and --max-rerank-k >= --max-k")
    manifest = read_manifest(args.index)
    layers = args.layers
    if args.bucket is not None or args.n_buckets is not None:  # a bucket names layers; the index must store them
        from siglip_dola.layers import DEFAULT_N_BUCKETS, default_layers
        from siglip_dola.modes import DEFAULT

        layers, _ = default_layers(manifest.num_layers, DEFAULT, bucket=args.bucket or args.n_buckets,
                                   n_buckets=args.n_buckets or DEFAULT_N_BUCKETS)
    given = {"alpha": args.alpha, "layers": layers, "static_layer": args.static_layer,
             "contrast_weight": args.contrast_weight, "mode": args.mode, "top_k": args.top_k,
             "rerank_k": args.rerank_k}
    flags = {name for name, value in given.items() if value is not None}
    base = RerankConfig(top_k=top_k, rerank_k=rerank_k, mode=args.mode, alpha=args.alpha,  # None: not given
                        static_layer=args.static_layer, layers=layers, contrast_weight=args.contrast_weight)
    model = load(args.model or manifest.model_id, device=args.device)
    service = SearchService(args.index, model, base, captions=args.captions, image_root=args.image_root,
                            limits=Limits(max_k=args.max_k, max_rerank_k=args.max_rerank_k), flags=flags,
                            calibration=args.calibration, calibration_name=args.calibration)
    app = create_app(service)
    sock = bind(args.host, args.port)
    if args.host not in LOOPBACK:
        print(f"{getattr(args, '_prog', 'siglip-dola serve')}: warning: --host {args.host} makes the page reachable "
              "from other machines", file=sys.stderr)
    print(f"siglip-dola serve: {url_of(sock)}  ({len(service.index)} images, model {model.model_id}; Ctrl-C stops)",
          flush=True)
    run(app, sock)
    return 0


serve_command.add_arguments = _serve_arguments
