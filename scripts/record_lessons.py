"""Record the course's lessons, one per stage of the cycle, into data/lessons/ (run again after retraining tiny).

PYTHONPATH=. python scripts/record_lessons.py   # about a minute on one CPU thread
"""

from __future__ import annotations

from cyclelab.workshop.lessons import LESSONS, Intervention, Pause, record

SPACE = " (type the token exactly, with its leading space if it has one: ' be', not 'be')"

LESSONS_BY_STAGE = {
    "fetch": dict(
        title="FETCH: text becomes tokens",
        stage="FETCH",
        prompt="First Citizen:\n",
        max_new_tokens=6,
        pauses=[
            Pause(
                0,
                "number",
                "Before anything runs, FETCH cuts the prompt 'First Citizen:' plus a newline into "
                "tokens and feeds them all in the first cycle. How many tokens is that?",
                "n_inputs",
            ),
            Pause(
                1,
                "number",
                "The model has written its first token. How many tokens does FETCH feed it in this second cycle?",
                "n_inputs",
            ),
            Pause(
                2,
                "discuss",
                "'Citizen' was cut into ' C', 'itiz' and 'en' (see the prompt's tokens in the "
                "debugger). Why would a tokenizer trained on Shakespeare split such a common word?",
            ),
        ],
    ),
    "read": dict(
        title="READ: the KV cache grows by one token per cycle",
        stage="READ",
        prompt="ROMEO:",
        max_new_tokens=8,
        pauses=[
            Pause(
                0,
                "number",
                "In the first cycle each attention head reads a key and a value for every token so "
                "far. How many keys does each head read?",
                "cache_len",
            ),
            Pause(
                4,
                "number",
                'Four tokens later the text is "ROMEO:\\nI\'ll be". How many keys does each head read in this cycle?',
                "cache_len",
            ),
            Pause(
                7,
                "discuss",
                "Each cycle reads the whole cache again. What happens to the cost of READ as the "
                "text grows, and what would happen without the cache?",
            ),
        ],
    ),
    "execute": dict(
        title="EXECUTE: switch off one attention head",
        stage="EXECUTE",
        prompt="ROMEO:",
        max_new_tokens=8,
        interventions=[Intervention(3, "ablate_head", layer=0, head=1)],
        pauses=[
            Pause(2, "predict", '"ROMEO:\\nI" ... which token does the intact model write next?' + SPACE),
            Pause(
                3,
                "predict",
                "The intact model writes ' be' here. Head 0.1 is now switched off (one head of 24). "
                "Which token does the model write now?" + SPACE,
            ),
            Pause(
                5,
                "discuss",
                'The intact model wrote "I\'ll be a man." Where does this run go instead, and what '
                "does that say about what head 0.1 computes?",
            ),
        ],
    ),
    "writeback": dict(
        title="WRITEBACK: predict the next token",
        stage="WRITEBACK",
        prompt="JULIET:\nO Romeo, Romeo",
        max_new_tokens=6,
        interventions=[
            Intervention(0, "choose", token=","),
            Intervention(2, "sampling", settings={"do_sample": True, "seed": 7}),
        ],
        pauses=[
            Pause(0, "predict", 'Juliet: "O Romeo, Romeo"... which token does the model write next?' + SPACE),
            Pause(0, "number", "How sure was the model of its first choice, in percent?", "chosen_percent", 5.0),
            Pause(
                1,
                "predict",
                "We forced ',' instead (the model's second choice). What comes after \"O Romeo, Romeo,\"?" + SPACE,
            ),
            Pause(
                2,
                "discuss",
                "From here on the token is sampled (seed 7) rather than taken greedily. Will the "
                "model still pick its first choice every time? Watch the 'p' of each new token.",
            ),
        ],
    ),
}


def main() -> None:
    LESSONS.mkdir(parents=True, exist_ok=True)
    for name, spec in LESSONS_BY_STAGE.items():
        spec = dict(spec)
        lesson = record("tiny", spec.pop("prompt"), spec.pop("max_new_tokens"), **spec)
        path = lesson.save(LESSONS / f"{name}.json")
        keys = [p.answer for p in lesson.pauses]
        print(f"{path}: {len(lesson.pauses)} pauses, tokens {lesson.tokens}, answers {keys}")


if __name__ == "__main__":
    main()
