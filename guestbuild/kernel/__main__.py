"""python -m guestbuild.kernel build [--print-path] [--jobs N] [--force]"""

import argparse
import sys

from guestbuild.cache import BuildError
from guestbuild.kernel.build import build_kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestbuild.kernel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find cached) bzImage + vmlinux")
    build.add_argument("--print-path", action="store_true", help="print the bzImage and vmlinux paths")
    build.add_argument("--jobs", type=int, default=None, help="parallel make jobs (default: all cores)")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    try:
        artifacts = build_kernel(jobs=args.jobs, force=args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.print_path:
        print(artifacts.bzimage)
        print(artifacts.vmlinux)
    return 0


if __name__ == "__main__":
    sys.exit(main())
