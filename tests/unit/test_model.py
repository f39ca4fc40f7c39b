import re
from importlib import resources

from mtad.model import DUE_STATES, TERMINAL_STATES, TRANSITIONS, RecipientState, can_transition


def test_sql_check_lists_exactly_the_model_states():
    sql = (resources.files("mtad.db") / "migrations" / "0001_queue.sql").read_text()
    check = re.search(r"state\s+text NOT NULL DEFAULT 'queued' CHECK \(state IN\s*\(([^)]*)\)", sql)
    assert check is not None
    assert set(re.findall(r"'(\w+)'", check.group(1))) == {s.value for s in RecipientState}


def test_terminal_states_have_no_way_out():
    assert TERMINAL_STATES == {
        RecipientState.DELIVERED,
        RecipientState.BOUNCED,
        RecipientState.EXPIRED,
        RecipientState.SUPPRESSED,
        RecipientState.CANCELLED,
    }
    for state in TERMINAL_STATES:
        assert not any(can_transition(state, target) for target in RecipientState)


def test_only_due_states_can_be_claimed():
    claimable = {state for state in RecipientState if can_transition(state, RecipientState.ACTIVE)}
    assert claimable == set(DUE_STATES)


def test_every_state_is_in_the_table():
    assert set(TRANSITIONS) == set(RecipientState)
