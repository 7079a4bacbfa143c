"""python -m guestbuild.agent build [--print-path] [--force]"""

import argparse
import sys

from guestbuild.agent.build import build_agent
from guestbuild.cache import BuildError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestbuild.agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find cached) the static guest agent binary")
    build.add_argument("--print-path", action="store_true", help="print the binary's path")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    try:
        path = build_agent(force=args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.print_path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
