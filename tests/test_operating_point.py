"""Operating points: one name, parsed back; the Pareto front and the best point under a budget; what a run has
measured."""

import json

import pytest

from flexres.operating_point import TABLE, OperatingPoint, best_within, measured_points, pareto_front


@pytest.mark.parametrize(
    "op, name",
    [
        (OperatingPoint(112), "112px"),
        (OperatingPoint(160, 0.5), "160px w0.5"),
        (OperatingPoint(160, 1.0, (0.45, 1, 1, 1)), "160px s0.45-1-1-1"),
        (OperatingPoint(96, 0.25, (0.5, 1)), "96px w0.25 s0.5-1"),
    ],
)
def test_one_name_per_point_read_back_from_text_and_file_names(op, name):
    assert op.name == str(op) == name
    assert op.file_tag == name.replace(" ", "_")
    assert OperatingPoint.parse(name) == OperatingPoint.parse(op.file_tag) == op


def test_a_bare_resolution_is_a_full_width_point_and_nonsense_is_refused():
    assert OperatingPoint.parse("224") == OperatingPoint.parse(224) == OperatingPoint(224)
    with pytest.raises(ValueError, match=r"'224 wide' is not an operating point"):
        OperatingPoint.parse("224 wide")


ROWS = [  # (resolution, width, top1, macs): 96 w1 ties 112 w0.5 in top-1 at a lower cost
    {"resolution": 112, "width": 1.0, "top1": 80.0, "macs": 100},
    {"resolution": 112, "width": 0.5, "top1": 75.0, "macs": 60},
    {"resolution": 96, "width": 1.0, "top1": 75.0, "macs": 50},
    {"resolution": 64, "width": 1.0, "top1": 60.0, "macs": 20},
    {"resolution": 64, "width": 0.5, "top1": 55.0, "macs": 30},
]


def test_the_front_keeps_only_points_nothing_cheaper_beats():
    front = pareto_front(ROWS)
    assert [(r["resolution"], r["width"]) for r in front] == [(64, 1.0), (96, 1.0), (112, 1.0)]
    # no point off the front is beaten by nothing: each has a front point at most as costly and at least as accurate
    for r in ROWS:
        assert any(f["macs"] <= r["macs"] and f["top1"] >= r["top1"] for f in front)


def test_the_best_within_a_budget_is_the_most_accurate_that_fits():
    assert best_within(ROWS, max_macs=99)["resolution"] == 96
    assert best_within(ROWS, max_macs=100)["resolution"] == 112
    with pytest.raises(ValueError, match=r"cheapest in the table, width 1 at 64 px, costs 0.0 MMACs"):
        best_within(ROWS, max_macs=10)
    with pytest.raises(ValueError, match="exactly one budget"):
        best_within(ROWS)


def test_a_run_knows_its_points_from_its_table_else_its_evaluations_else_nothing(tmp_path):
    assert measured_points(tmp_path).source == "trained" and measured_points(tmp_path).rows == []
    for policy, acc in (("nearest", {"64": 70.0, "48": 60.0}), ("interpolate", {"64": 72.0, "56": 66.0})):
        (tmp_path / f"eval_{policy}.json").write_text(json.dumps({"results": {r: {"top1": a} for r, a in acc.items()}}))
    m = measured_points(tmp_path)
    assert m.source == "eval"
    assert {r["resolution"]: r["top1"] for r in m.rows} == {64: 72.0, 48: 60.0, 56: 66.0}  # the best policy of each
    assert m.top1(OperatingPoint(56)) == 66.0 and m.top1(OperatingPoint(80)) is None
    (tmp_path / TABLE).write_text(json.dumps({"bn_policy": "nearest", "rows": ROWS}))
    m = measured_points(tmp_path)
    assert (m.source, m.bn_policy, len(m.rows)) == ("table", "nearest", 5)
    assert m.top1(OperatingPoint(112, 0.5)) == 75.0
