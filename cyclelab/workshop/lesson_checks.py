"""A lesson's interventions checked against the model it is opened on (``Lesson.open`` calls it).

The lesson file's shape is checked when it is read; what depends on the model (a forced token id
within its vocabulary, an ablated head within its layers and heads) is checked here, when the
lesson is opened, so a bad lesson fails at once, naming the file and the field, never halfway
through a class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cyclelab.core.engine import Engine

if TYPE_CHECKING:
    from cyclelab.workshop.lessons import Lesson


def check_interventions(lesson: Lesson, engine: Engine) -> None:
    """``ValueError`` naming the lesson's file and the field of the first intervention ``engine``'s model cannot do."""
    limits = {
        "token_id": (engine.vocab_size, "token ids", "its vocabulary"),
        "layer": (engine.arch.n_layers, "layers", "its layers"),
        "head": (engine.arch.n_heads, "heads per layer", "its heads"),
    }
    for i, iv in enumerate(lesson.interventions):
        for field, (size, what, within) in limits.items():
            value = getattr(iv, field)
            if value is not None and not 0 <= value < size:
                raise ValueError(
                    f"{lesson.source or repr(lesson.title) or 'the lesson'}: interventions[{i}].{field} is {value}, but "
                    f"{engine.loaded.name!r} has {size} {what} (0 to {size - 1}), so this {iv.kind} intervention "
                    f"is outside {within}: fix interventions[{i}] in the lesson file, or record the lesson again "
                    f"(scripts/record_lessons.py)"
                )
