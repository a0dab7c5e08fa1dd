"""The `relay` command: a thin mapping from arguments onto the settings, the store and the server.

Every listing and creating command takes `--json`. Errors print one line
(`relay: ...`) and exit 1; a bad setting exits 2. The commands live by concept:
`serve` (running the relay and its database), `manage` (the admin commands),
`log` (the delivery log); `parser` maps the command line onto them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from relay.cli.parser import build_parser
from relay.errors import ConfigError, RelayError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        handler: Callable[[argparse.Namespace], int | None] = args.handler
        return handler(args) or 0
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
