"""Utterance-per-row dialogue corpora (ConvoKit style) -> multi-turn training windows."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from training.data.errors import DataError, Drop
from training.data.formats import required_field, turn_text, with_system

DIALOGUE_ORDER_FIELDS = ("timestamp", "index", "order", "turn", "utterance_index")


def dialogue_windows(rows: list[Any], assistant_speaker: str | None, window: int, system: str | None,
                     drops: Counter, name: str = "source") -> list[list[dict]]:
    """Utterance rows (speaker, text, conversation_id, an order field) -> multi-turn windows.

    Each window ends at an utterance of the assistant speaker (or of every speaker in turn when none is chosen)
    and holds up to `window` utterances before it; the other speakers are the user, named in the text
    ("Ross: ..."), and consecutive turns of one role are merged.
    """
    # The first order field that holds values (ConvoKit leaves timestamp null in some corpora); else file order.
    order_key = next((k for k in DIALOGUE_ORDER_FIELDS
                      if any(isinstance(r, dict) and r.get(k) is not None for r in rows)), None)
    convs: dict[Any, list[tuple]] = defaultdict(list)
    for pos, row in enumerate(rows):
        if not isinstance(row, dict):
            continue  # counted as invalid_json by the caller
        try:
            speaker, conv = str(required_field(row, "speaker")).strip(), required_field(row, "conversation_id")
            text = turn_text(required_field(row, "text"))
            order = required_field(row, order_key) if order_key else pos
        except Drop as d:
            drops[d.reason] += 1
            continue
        if not speaker:
            drops["missing_field"] += 1
            continue
        convs[conv].append((order, pos, speaker, text))

    wanted = assistant_speaker.strip().lower() if assistant_speaker else None
    if wanted and not any(u[2].lower() == wanted for us in convs.values() for u in us):
        seen = Counter(u[2] for us in convs.values() for u in us).most_common(8)
        raise DataError(f"assistant_speaker {assistant_speaker!r} never speaks in {name}; "
                        f"most frequent speakers: {', '.join(s for s, _ in seen)}")
    out = []
    for utts in convs.values():
        try:
            utts.sort(key=lambda u: (u[0], u[1]))
        except TypeError:
            raise DataError(f"order field {order_key!r} of {name} mixes types; accepted: all numbers or all "
                            "strings") from None
        for i, (_, _, speaker, _) in enumerate(utts):
            if (wanted or speaker.lower()) != speaker.lower():
                continue
            me = speaker.lower()
            messages: list[dict] = []
            for _, _, who, text in utts[max(0, i - window + 1): i + 1]:
                role = "assistant" if who.lower() == me else "user"
                content = text if role == "assistant" else f"{who}: {text}"
                if messages and messages[-1]["role"] == role:
                    messages[-1]["content"] += "\n" + content
                else:
                    messages.append({"role": role, "content": content})
            if messages[0]["role"] == "assistant":
                messages = messages[1:]
            if messages:  # empty when the speaker opens the conversation: no context to answer
                out.append(with_system(messages, system.replace("{speaker}", speaker) if system else None))
    return out
