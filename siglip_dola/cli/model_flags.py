"""The model flags eval, calibrate, classify and rerank share: --model, and the parts taken from other checkpoints
(--head-from, --text-from, --logit-scale, --logit-bias; loading/borrowed.py). No subcommand lives here."""
from __future__ import annotations

MODEL_HELP = ("model name, hub id or local path (default: the embedded model); 'janus:FOLDER' or "
              "'janus:deepseek-community/Janus-Pro-1B' reads transformers' Janus vision tower (with --head-from)")


def add_model_arguments(parser) -> None:
    """--model and the borrowing flags."""
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--head-from", default=None, metavar="SIGLIP",
                        help="read the model's layers through this SigLIP checkpoint's MAP head and score with its "
                             "text tower and logit scale (Janus: the SigLIP its tower came from, e.g. "
                             "google/siglip-large-patch16-384 or ViT-L-16-SigLIP-384:webli)")
    parser.add_argument("--text-from", default=None, metavar="MODEL",
                        help="take the text tower and logit scale from this checkpoint instead (default: --head-from's, "
                             "else the model's own)")
    parser.add_argument("--logit-scale", type=float, default=None,
                        help="logit scale in log space (exp(logit_scale) = 1/tau), instead of the text checkpoint's; "
                             "required for a vision-only model without --head-from / --text-from")
    parser.add_argument("--logit-bias", type=float, default=None,
                        help="logit bias (default: the text checkpoint's; the softmax does not use it)")


def load_model(args, device, precision=None):
    """The LoadedModel the flags name (ValueError for a bad name or missing files, naming the flag)."""
    from siglip_dola.loading import load

    text_from = None if args.text_from == args.head_from else args.text_from   # named twice: loaded once
    try:
        return load(args.model, device=device, precision=precision, head_from=args.head_from,
                    text_from=text_from, logit_scale=args.logit_scale, logit_bias=args.logit_bias)
    except OSError as err:  # unknown names / missing hub files surface as OSError subclasses too
        raise ValueError(str(err)) from None
