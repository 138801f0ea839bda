"""`siglip-dola serve INDEX`: a local search page over a retrieval index (off and DoLa side by side)."""
from __future__ import annotations

import sys

from siglip_dola.cli import int_at_least, subcommand
from siglip_dola.cli.classify import parse_layers

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _serve_arguments(parser) -> None:
    parser.add_argument("index", help="index folder (from `siglip-dola index build`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int_at_least(0), default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--model", default=None, help="model (default: the index's model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--captions", default=None, help="caption file (.txt / .csv): enables image upload -> captions")
    parser.add_argument("--image-root", default=None, help="folder holding the indexed images if they moved (by file name)")
    parser.add_argument("--top-k", type=int_at_least(1), default=10, help="default k on the page")
    parser.add_argument("--rerank-k", type=int_at_least(1), default=100, help="default rerank-k on the page")
    parser.add_argument("--max-k", type=int_at_least(1), default=100, help="largest k a request may ask for")
    parser.add_argument("--max-rerank-k", type=int_at_least(1), default=1000, help="largest rerank-k a request may ask for")
    parser.add_argument("--mode", choices=("off", "static", "dynamic"), default="dynamic", help="default DoLa mode")
    parser.add_argument("--alpha", type=float, default=None, help="head constraint alpha (default 0.1)")
    parser.add_argument("--layers", type=parse_layers, default=None, help="candidate layers (a subset of the index's)")
    parser.add_argument("--static-layer", type=int, default=None, help="premature layer for static mode")
    parser.add_argument("--calibration", default=None,
                        help="calibration JSON of `siglip-dola calibrate` (or 'embedded'): its best static / dynamic "
                             "settings apply where no flag is given")


@subcommand("serve", help="Serve a local search page and JSON API over a retrieval index (127.0.0.1 by default).")
def serve_command(args) -> int:
    from siglip_dola.loading import load
    from siglip_dola.retrieval import RerankConfig
    from siglip_dola.retrieval.storage import read_manifest
    from siglip_dola.viewer.app import bind, create_app, run, url_of
    from siglip_dola.viewer.service import Limits, SearchService

    if args.rerank_k < args.top_k or args.max_rerank_k < args.max_k:
        raise ValueError("--rerank-k must be >= --top-k and --max-rerank-k >= --max-k")
    flags = {name for name, value in (("alpha", args.alpha), ("layers", args.layers),
                                      ("static_layer", args.static_layer)) if value is not None}
    base = RerankConfig(top_k=args.top_k, rerank_k=args.rerank_k, mode=args.mode,
                        alpha=0.1 if args.alpha is None else args.alpha, static_layer=args.static_layer,
                        layers=args.layers)
    model = load(args.model or read_manifest(args.index).model_id, device=args.device)
    service = SearchService(args.index, model, base, captions=args.captions, image_root=args.image_root,
                            limits=Limits(max_k=args.max_k, max_rerank_k=args.max_rerank_k), flags=flags,
                            calibration=args.calibration, calibration_name=args.calibration)
    app = create_app(service)
    sock = bind(args.host, args.port)
    if args.host not in LOOPBACK:
        print(f"warning: --host {args.host} makes the page reachable from other machines", file=sys.stderr)
    print(f"siglip-dola serve: {url_of(sock)}  ({len(service.index)} images, model {model.model_id}; Ctrl-C stops)",
          flush=True)
    run(app, sock)
    return 0


serve_command.add_arguments = _serve_arguments
