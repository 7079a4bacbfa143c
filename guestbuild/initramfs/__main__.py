"""python -m guestbuild.initramfs build [--print-path] [--no-gzip] [--no-agent]"""

import argparse
import sys

from guestbuild.cache import BuildError
from guestbuild.initramfs.builder import build_initramfs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestbuild.initramfs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find cached) the guest initramfs")
    build.add_argument("--print-path", action="store_true", help="print the initramfs path")
    build.add_argument("--no-gzip", action="store_true", help="uncompressed cpio")
    build.add_argument("--no-agent", action="store_true", help="leave out /sbin/pclite-agent (built by default)")
    args = parser.parse_args(argv)
    try:
        path = build_initramfs(compress=not args.no_gzip, agent=not args.no_agent)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.print_path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
