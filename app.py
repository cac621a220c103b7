"""SR INT8 Lab: the Gradio app, a thin shell over `sr/`; the page itself is the `ui` package (docs/layout.md).

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--allow-training]
"""
from __future__ import annotations

import argparse
import logging
import os

from ui import jobs
from ui.layout import CSS, build_demo
from ui.server import clean_up, launch


def main() -> None:
    """Parse the command line and launch the server."""
    parser = argparse.ArgumentParser(description="SR INT8 Lab")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="a temporary public gradio.live link")
    parser.add_argument("--allow-training", action="store_true", help="let users train models (off on a public "
                        "Space; SR_ALLOW_TRAINING=1 does the same)")
    args = parser.parse_args()
    jobs.POLICY.enabled = jobs.POLICY.enabled or args.allow_training
    logging.basicConfig(level=logging.INFO)
    clean_up()
    launch(build_demo(), args.host, args.port, args.share, CSS)


if __name__ == "__main__":
    main()
