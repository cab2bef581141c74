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


def reflection_request(n_steps: int, trigger: str) -> str:
    """Asks for strict JSON: how many steps to keep (0..n-1) and what to do differently.

    At a periodic check the agent may keep every step (``rollback_step == n``): no rollback.
    """
    head = TRIGGER_TEXT.get(trigger, "")
    keep_all = (
        f" If the attempt is on track, answer with rollback_step {n_steps} (keep every step)."
        if trigger == "periodic"
        else ""
    )
    return (
        f"{head} You have taken {n_steps} step(s) since the start (steps 1 to {n_steps}). "
        "Find the first step that went wrong, using the feedback you received. "
        "Reply with only a JSON object, no other text: "
        '{"rollback_step": K, "experience": "..."} where K is the number of steps to keep '
        f"(0 restarts from the beginning; at most {n_steps - 1}) and experience says, in one or two "
        f"sentences, what to do differently from that point.{keep_all}"
    )


def correction_message(error: str, n_steps: int) -> str:
    """Sent after a malformed reflection reply, before the retry."""
    return (
        f"That reply was not usable: {error}. Reply again with only the JSON object "
        f'{{"rollback_step": K, "experience": "..."}} with K an integer from 0 to {n_steps - 1}.'
    )
