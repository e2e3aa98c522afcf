from settler import texttable


def test_names_left_amounts_right_two_spaces_apart_no_trailing_blanks() -> None:
    rows = [("ASSET", "TOTAL", "NOTE"), ("BTC", "1.5", ""), ("USDT", "623.45", "x")]

    assert texttable.render(rows).splitlines() == [
        "ASSET   TOTAL  NOTE",
        "BTC       1.5",
        "USDT   623.45     x",
    ]


def test_left_sets_how_many_columns_are_left_aligned() -> None:
    rows = [("USER", "ASSET", "N"), ("7", "BTC", "10"), ("1001", "ETH", "2")]

    assert texttable.render(rows, left=2).splitlines() == [
        "USER  ASSET   N",
        "7     BTC    10",
        "1001  ETH     2",
    ]
