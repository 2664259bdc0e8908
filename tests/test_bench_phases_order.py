"""benchmarks/phases.py runs the systems it compares in an order that spreads a drift over all of them."""

from benchmarks.phases import round_robin


def test_every_other_round_runs_the_systems_in_reverse() -> None:
    assert "".join(round_robin("blp", 3)) == "blpplbblp"


def test_each_system_runs_once_per_round_and_first_as_often_as_last() -> None:
    order = round_robin("bp", 4)
    assert order.count("b") == order.count("p") == 4
    firsts = [order[i] for i in range(0, len(order), 2)]
    assert firsts.count("b") == firsts.count("p") == 2
