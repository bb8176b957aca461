"""The kinds of work of the engine loop. Each module holds one kind whole: its request (what a
caller submits), its step (one packed model call), how the scheduler picks it, how the runner
runs it and how its results go back. ``default_kinds`` is the loop's list; a new kind is a new
module here, added to that list (or to a running scheduler with ``Scheduler.add_kind``)."""


def default_kinds(decode_bytes: int, kv_bytes):
    """The kinds every engine runs, in the order the scheduler offers them turns."""
    from engine.core.steps.generate import generation_kinds
    from engine.core.steps.passage import PassageKind
    from engine.core.steps.prefix import PrefixKind
    from engine.core.steps.score import ScoreKind
    from engine.core.steps.tokens import TokenStatesKind

    return [PrefixKind(), *generation_kinds(decode_bytes, kv_bytes), PassageKind(), ScoreKind(), TokenStatesKind()]
