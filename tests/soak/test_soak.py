"""The soak in `make test`: 30 s of demo generations submitted at random moments to two hub nodes and two workers
with compressed timings, no kills. Every generation starts within 2 s of its submission, arrives whole and exactly
once, and every worker keeps taking its share (`make soak` runs the same for 10 minutes with kills)."""

from __future__ import annotations

import pytest

from tests.soak.harness import Soak, SoakConfig

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]

DURATION_S = 30.0
START_BOUND_S = 2.0


# Submissions for 30 s, then up to 20 s for the last generations; start-up and teardown on a loaded machine.
@pytest.mark.timeout(180)
async def test_every_generation_starts_within_2s_and_arrives_whole_exactly_once() -> None:
    soak = Soak(SoakConfig(duration_s=DURATION_S, finish_timeout_s=20.0))
    try:
        report = await soak.run()
        summary = report.format()
        print(summary)
        late = report.started_late(START_BOUND_S)
        assert report.jobs, summary
        assert not late, f"{len(late)} generations did not start within {START_BOUND_S}s\n{summary}\n{soak.logs()}"
        assert not report.idle_workers(), f"a worker stopped taking jobs\n{summary}\n{soak.logs()}"
        assert report.lost == 0 and report.duplicated == 0, summary
        assert all(j.finished and j.terminals == 1 for j in report.jobs), summary
        assert not report.failed and not report.submit_errors, summary
        assert report.ok(strict=True), summary
    finally:
        await soak.aclose()
