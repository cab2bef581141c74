"""The reflection exchange's texts: the request for a reflection and the correction after a bad reply.

The reflection exchange never enters a tree (only its outcome does); the messages that do enter
trajectories (observation, experience) live in ``leafe_fast.trajectory``.
"""

from __future__ import annotations

TRIGGER_TEXT = {
    "periodic": "Pause and check your progress so far.",
    "failed": "This attempt failed.",
    "depth": "This attempt ran out of steps without finishing the task.",
    "success": "This attempt succeeded, but a better one may exist.",
}


def _max_keep(n_steps: int, trigger: str) -> int:
    return n_steps if trigger == "periodic" else n_steps - 1


def valid_range(ctx) -> str:
    """The valid rollback steps of a reflection context, as the prompts write them."""
    hi = ctx.n_steps if ctx.may_keep_all else ctx.n_steps - 1
    return f"0..{hi}"


def reflection_request(n_steps: int, trigger: str) -> str:
    """Asks for strict JSON: how many steps to keep and what to do differently.

    K ranges over 0..n-1 after a failed or cut-off attempt; at a periodic check the attempt is still
    running, so K = n (keep every step, no rollback) is allowed too and the prompt says so once.
    """
    head = TRIGGER_TEXT.get(trigger, "")
    hi = _max_keep(n_steps, trigger)
    if trigger == "periodic":
        keep = (f"K is an integer from 0 to {hi}: 0 restarts from the beginning, K < {n_steps} goes back "
                f"to the state after step K, and {n_steps} keeps every step because the attempt is on track.")
    else:
        keep = (f"K is an integer from 0 to {hi}: 0 restarts from the beginning, K goes back to the "
                "state after step K.")
    return (
        f"{head} You have taken {n_steps} step(s) since the start (steps 1 to {n_steps}). "
        "Find the first step that went wrong, using the feedback you received. "
        "Reply with only a JSON object, no other text: "
        '{"rollback_step": K, "experience": "..."} where K is the number of steps to keep. '
        f"{keep} The experience says, in one or two sentences, what to do differently from that point."
    )


def correction_message(error: str, n_steps: int, may_keep_all: bool = False) -> str:
    """Sent after a malformed reflection reply, before the retry."""
    hi = n_steps if may_keep_all else n_steps - 1
    return (
        f"That reply was not usable: {error}. Reply again with only the JSON object "
        f'{{"rollback_step": K, "experience": "..."}} with K an integer from 0 to {hi}.'
    )
