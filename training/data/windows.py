"""Token lengths of conversations as training sees them (the tokenizer's chat template applied), and long
multi-turn conversations split into windows of whole exchanges that fit `train.max_length`.

A window keeps the system prompt, starts with a user turn and ends with an assistant turn; consecutive windows do
not overlap, so every assistant turn is trained once. The fit is checked on the tokens
`training.chat_format.encode_conversation` produces, the very examples the trainer sees.
"""
from __future__ import annotations

from training.chat_format import encode_conversation
from training.data.errors import DataError

NO_LIMIT = 1 << 62


def token_lengths(tokenizer, conversations: list[list[dict]], batch: int = 256) -> list[int]:
    """Tokens of each conversation rendered with the tokenizer's own chat template (as training sees it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat_template; set the recipe's template on it before prepare_data "
                        "(token lengths are measured on the templated conversation)")
    lengths = []
    for i in range(0, len(conversations), batch):
        texts = tokenizer.apply_chat_template(conversations[i:i + batch], tokenize=False)
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths.extend(len(ids) for ids in enc)
    return lengths


def encoded_length(tokenizer, messages: list[dict]) -> int:
    """Length of the training example before any cut (an EOS may follow the template's last token)."""
    try:
        return len(encode_conversation(tokenizer, messages, NO_LIMIT)["input_ids"])
    except ValueError:  # a template that is not prefix-stable: tokenisation will count the row; use the render
        return token_lengths(tokenizer, [messages])[0]


def fit_windows(tokenizer, messages: list[dict], max_length: int, length: int) -> list[tuple[list[dict], int]]:
    """[(window, its length in tokens)]: the conversation itself when it fits or holds one exchange, else windows
    of whole exchanges, each as long as fits. `length` is the conversation's templated length (token_lengths).

    A window over max_length is a single exchange that alone does not fit: it is cut at max_length when tokenised.
    Exchange costs are estimated from one render of each exchange alone (so a window costs O(its length), not
    O(the conversation's length)); each window is then measured exactly and shrunk while it does not fit.
    """
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head):]
    pairs = [body[i:i + 2] for i in range(0, len(body), 2)]
    if length < max_length or len(pairs) < 2:
        return [(messages, length)]
    if length == max_length:  # the EOS that encode_conversation may append decides
        exact = encoded_length(tokenizer, messages)
        if exact <= max_length:
            return [(messages, exact)]
    solo = token_lengths(tokenizer, [head + p for p in pairs])
    both = token_lengths(tokenizer, [head + pairs[0] + pairs[1]])[0]
    base = solo[0] + solo[1] - both  # what every window repeats: BOS, template preamble, system prompt
    cost = [n - base for n in solo]
    windows: list[tuple[list[dict], int]] = []
    i = 0
    while i < len(pairs):
        j, estimate = i + 1, base + cost[i]
        while j < len(pairs) and estimate + cost[j] <= max_length:
            estimate += cost[j]
            j += 1
        window = head + [m for p in pairs[i:j] for m in p]
        n = encoded_length(tokenizer, window)
        while n > max_length and j - i > 1:
            j -= 1
            window = head + [m for p in pairs[i:j] for m in p]
            n = encoded_length(tokenizer, window)
        windows.append((window, n))
        i = j
    return windows
