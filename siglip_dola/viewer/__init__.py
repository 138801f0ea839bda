"""Viewers: the self-contained HTML evaluation report and the local search page.

    from siglip_dola.viewer import write_report          # report.html from eval's Result JSON + Predictions JSONL
    from siglip_dola.viewer.app import create_app         # Starlette app over a retrieval index (needs starlette)
"""
from siglip_dola.viewer.report import write_report

__all__ = ["write_report"]
