"""`python -m tests.soak --duration S [--kills] [--seed N]`: run the soak, print its report, exit 1 when a generation
was lost, duplicated, cut short or never finished; without --kills also when one did not start within 2 s or a worker
stopped taking its share.

With --kills a generation may wait for a claim take-over (3 s here) before it starts, so start latencies are reported
rather than bounded; every generation must still finish, whole and exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests.soak.harness import Soak, SoakConfig


async def _main(config: SoakConfig, verbose: bool) -> int:
    soak = Soak(config)
    try:
        report = await soak.run()
        ok = report.ok(strict=not config.kills)
        print(report.format())
        if not ok and verbose:
            print(soak.logs())
        print("soak: OK" if ok else "soak: FAILED")
        return 0 if ok else 1
    finally:
        await soak.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of submissions (default 30)")
    parser.add_argument("--kills", action="store_true", help="kill -9 random hub nodes and workers meanwhile")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random schedule (printed in the report)")
    parser.add_argument("--finish-timeout", type=float, default=30.0, help="seconds a generation may take (default 30)")
    parser.add_argument("--logs", action="store_true", help="print the tails of the processes' logs on failure")
    args = parser.parse_args()
    if args.duration <= 0 or args.finish_timeout <= 0:
        parser.error("--duration and --finish-timeout must be positive")
    config = SoakConfig(
        duration_s=args.duration, kills=args.kills, seed=args.seed, finish_timeout_s=args.finish_timeout
    )
    sys.exit(asyncio.run(_main(config, args.logs)))


if __name__ == "__main__":
    main()
