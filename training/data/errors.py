"""What can go wrong with data: a bad option or source (DataError, the run stops) and a malformed row (Drop, the
row is skipped and counted under one of DROP_REASONS)."""
from __future__ import annotations

# Every reason a row can be dropped for, in the order the checks run. Tests and the report use these names.
# The conversation-shape reasons from multiple_system on apply only to sources read with `repair: false`.
DROP_REASONS = {
    "invalid_json": "a line / item that is not a JSON object",
    "missing_field": "a required field is absent or null",
    "bad_type": "a field has the wrong type (e.g. a turn's text is not a string)",
    "unparsable_text": "guanaco text without '### Human:' / '### Assistant:' markers, or text before the first one",
    "unknown_role": "a role that is not in the role table (ROLE_ALIASES), e.g. tool or function",
    "empty_turn": "a turn whose text is empty or whitespace (repaired: only when no exchange is left without them)",
    "no_assistant_turn": "no assistant turn answering a user turn: nothing to train on",
    "multiple_system": "more than one system message",
    "system_not_first": "a system message after the first turn",
    "not_starting_with_user": "the first non-system turn is not the user's",
    "not_alternating": "two user or two assistant turns in a row",
    "not_ending_in_assistant": "the last turn is not the assistant's",
    "low_score": "quality score below min_score",
    "duplicate": "exact duplicate (case and whitespace ignored) of an earlier row",
    "near_duplicate": "Jaccard similarity of character shingles >= near_dedup with an earlier row",
    "in_validation": "a training row identical to a validation row (leak)",
    "too_short": "fewer templated tokens than min_tokens",
    "too_long": "more templated tokens than max_tokens",
}

# What `repair` may cut from a conversation that is kept (counted once per conversation and reason).
TRIM_REASONS = {
    "empty_turn": "empty turns removed",
    "leading_assistant": "assistant turns before the first user turn removed (dumps chunked mid-conversation)",
    "system_mid": "system turns after the first user turn removed",
    "merged_same_role": "consecutive turns of one role merged into one",
    "trailing_user": "a last user turn with no answer removed",
}


class DataError(ValueError):
    """Bad data options, an unreadable source, or no usable rows left."""


class Drop(Exception):
    """A malformed row; `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
