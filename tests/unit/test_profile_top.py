"""`bench e2e --profile`: py-spy's folded stacks ranked by self and inclusive share."""

from __future__ import annotations

from pathlib import Path

from router_worker.bench_e2e import profile_top, profiles_json

FOLDED = """\
main (/x/bench_e2e.py:10);process (/x/router_worker/pipeline/router.py:300);plan (/x/plan.py:5) 6
main (/x/bench_e2e.py:10);process (/x/router_worker/pipeline/router.py:301);publish (/x/publish.py:9) 3
main (/x/bench_e2e.py:11);select (/usr/lib/selectors.py:468) 1
garbage line without a count
"""


def test_shares_merge_lines_of_one_function_and_sum_to_one() -> None:
    own, inclusive = profile_top(FOLDED)
    assert own == [("plan (plan.py)", 0.6), ("publish (publish.py)", 0.3), ("select (selectors.py)", 0.1)]
    assert dict(inclusive) == {"process (router.py)": 0.9}, "the project's own; two lines of it count once"


def test_an_empty_profile_has_no_entries() -> None:
    assert profile_top("") == ([], [])


def test_relative_paths_of_a_checkout_count_as_ours_and_site_packages_do_not() -> None:
    folded = ("main (router_worker/bench_e2e.py:10);step (router_worker/pipeline/router.py:9);"
              "send (/v/lib/site-packages/aiokafka/producer.py:3) 4\n")  # fmt: skip
    own, inclusive = profile_top(folded)
    assert own == [("send (producer.py)", 1.0)]
    assert dict(inclusive) == {"main (bench_e2e.py)": 1.0, "step (router.py)": 1.0}


def test_profiles_as_json_name_each_router(tmp_path: Path) -> None:
    (tmp_path / "router1-0.folded").write_text(FOLDED)
    (tmp_path / "router1-0.py-spy.log").write_text("not a profile")
    doc = profiles_json(tmp_path)
    assert list(doc) == ["router1-0.folded"]
    assert doc["router1-0.folded"]["self"][0] == ("plan (plan.py)", 0.6)
