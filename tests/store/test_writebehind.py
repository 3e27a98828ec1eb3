"""How the write-behind core cuts a batch into statements."""

from __future__ import annotations

from store.writebehind import Kind, Op, runs


def op(kind: Kind, label: str) -> Op:
    return Op(kind, session_key=label, queued_at=0.0, name=label)


def test_appends_and_doc_writes_between_barriers_become_one_statement_each() -> None:
    a1, d1, a2, d2 = (
        op(Kind.APPEND, "a1"),
        op(Kind.PUT_DOC, "d1"),
        op(Kind.APPEND, "a2"),
        op(Kind.PUT_DOC, "d2"),
    )
    cut, a3, d3 = op(Kind.TRUNCATE, "t"), op(Kind.APPEND, "a3"), op(Kind.PUT_DOC, "d3")
    gone, d4 = op(Kind.DELETE, "x"), op(Kind.PUT_DOC, "d4")
    batch = [a1, d1, a2, d2, cut, a3, d3, gone, d4]
    assert list(runs(batch)) == [[a1, a2], [d1, d2], [cut], [a3], [d3], [gone], [d4]]


def test_consecutive_barriers_stay_one_statement_each_in_queue_order() -> None:
    first, second = op(Kind.TRUNCATE, "t1"), op(Kind.DELETE, "t2")
    after = op(Kind.APPEND, "a")
    assert list(runs([first, second, after])) == [[first], [second], [after]]
    assert list(runs([])) == []
