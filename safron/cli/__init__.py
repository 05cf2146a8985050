"""Command-line tools, one module each: render (safron-render), masks (safron-masks), train (safron-train), export
(safron-export), eval (safron-eval); `common` holds what they share (run_main, the parser, argument types, the exit
codes and the exit-status text of --help). Library modules never import this package: it imports them.

`python -m safron.cli MASK OUT ...` is safron-render."""

from __future__ import annotations

from .common import (
    EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_MEANINGS, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, exit_status_help, run_main,
)
from .masks import main as masks_main
from .masks import masks_parser
from .render import main as render_main
from .render import render_parser

__all__ = [
    "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_MEANINGS",
    "exit_status_help", "run_main", "render_main", "render_parser", "masks_main", "masks_parser",
]
