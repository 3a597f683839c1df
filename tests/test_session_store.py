"""chatbot/session_store.py: per-session server state stays bounded - idle sessions expire, and beyond the number of
sessions or the byte budget the least recently used go first, never the one being served."""
from chatbot.session_store import SessionStore


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(clock=None, **limits) -> SessionStore[dict]:
    return SessionStore(dict, **{"max_sessions": 100, "max_bytes": 10_000, "idle_seconds": 60, **limits},
                        clock=clock or Clock())


def test_a_session_keeps_its_state_until_it_has_been_idle_too_long():
    clock = Clock()
    s = store(clock)
    s.use("a")["x"] = 1
    clock.now = 59
    assert s.use("a") == {"x": 1}
    s.charge("a", 500)
    clock.now = 59 + 61
    s.use("b")
    assert "a" not in s and len(s) == 1 and s.nbytes == 0
    assert s.use("a") == {}  # a new, empty state


def test_the_least_recently_used_sessions_go_first_beyond_the_count_or_the_bytes():
    s = store(max_sessions=3)
    for key in "abcd":
        s.use(key)
    assert list(s.entries) == ["b", "c", "d"]
    s = store(max_bytes=1000)
    for key in "abc":
        s.use(key)
        s.charge(key, 400)
    assert list(s.entries) == ["b", "c"] and s.nbytes == 800
    s.charge("c", 5000)  # one session over the whole budget: the others go, it stays
    assert list(s.entries) == ["c"] and s.nbytes == 5400
    s.charge("c", -5000)
    assert s.nbytes == 400
