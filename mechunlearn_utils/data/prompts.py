"""Prompt formats, in one place.

Sports (the paper's athletes task):

* ``normal``   the paper's one-shot training format
  ``"Fact: Tiger Woods plays the sport of golf\\nFact: {athlete} plays the sport of"``
* ``question`` a one-shot question/answer format the edit never trains on
* ``mcq``      one-shot A-D multiple choice; the answer is a letter

CounterFact: the relation prompt, its paraphrases, neighbourhood prompts, and A-D multiple choice.

Every builder returns `PromptSet`: prompts, the candidate answers scored for each prompt, and the
index of the correct candidate. Evaluations normalize the model's probability over candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechunlearn_utils.core.reproducibility import text_seed

SPORTS = ("basketball", "baseball", "football")
ONE_SHOT_ATHLETE, ONE_SHOT_SPORT = "Tiger Woods", "golf"
MCQ_LETTERS = ("A", "B", "C", "D")

SPORT_TEMPLATES = {
    "normal": "Fact: Tiger Woods plays the sport of golf\nFact: {athlete} plays the sport of",
    "question": ("Question: What sport does Tiger Woods play?\nAnswer: golf\n"
                 "Question: What sport does {athlete} play?\nAnswer:"),
}
SPORT_FORMATS = ("normal", "question", "mcq")

# The paper's own texts (magikarp01/tasks `facts/SportsTaskAdversarial.py`: `SportsTask_ICL_SYS` with
# use_system_prompt=True, and `SportsTask_MC` one shot), measured next to ours (notebook 00).
PAPER_SYSTEM_PROMPT = ("You are a helpful chatbot that answers questions about athletes. "
                       "Please be maximally helpful and factually correct.")
_PAPER_MCQ_OPTIONS = "\nA: Football\nB: Baseball\nC: Basketball\nD: Golf\n\nAnswer:"
PAPER_SPORT_TEMPLATES = {
    "paper_question": (PAPER_SYSTEM_PROMPT + " Question: What sport does Tiger Woods play? Answer: golf\n"
                       "Question: What sport does {athlete} play? Answer:"),
    "paper_mcq": ("Fact: Tiger Woods plays the sport of" + _PAPER_MCQ_OPTIONS + " D\n\n"
                  "Fact: {athlete} plays the sport of" + _PAPER_MCQ_OPTIONS),
}
PAPER_MCQ_ORDER = ("football", "baseball", "basketball", "golf")  # A, B, C, D in every paper_mcq prompt
PAPER_SPORT_FORMATS = tuple(PAPER_SPORT_TEMPLATES)

# Formats no edit ever trains on (used by the attacks notebook).
SPORT_PARAPHRASE_TEMPLATES = (
    "Tiger Woods is famous for playing golf. {athlete} is famous for playing",
    "The professional sport of Tiger Woods: golf. The professional sport of {athlete}:",
    "Everyone knows Tiger Woods as a golf player and {athlete} as a",
)


@dataclass
class PromptSet:
    """Prompts with their candidate answers (strings with a leading space) and the right one."""

    prompts: list[str]
    candidates: list[list[str]]
    correct: list[int]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def __post_init__(self):
        if not (len(self.prompts) == len(self.candidates) == len(self.correct)):
            raise ValueError("prompts, candidates and correct must have the same length")


def mcq_block(question: str, options: list[str], answer_letter: str | None = None) -> str:
    """One multiple-choice item: question, A-D options, 'Answer:' (+ letter for a shot)."""
    lines = [f"Question: {question}"]
    lines += [f"{letter}. {opt.strip()}" for letter, opt in zip(MCQ_LETTERS, options)]
    lines.append("Answer:" + (f" {answer_letter}" if answer_letter else ""))
    return "\n".join(lines)


def shuffled_options(correct: str, distractors: list[str], key: str) -> tuple[list[str], int]:
    """Correct answer + 3 distractors in an order fixed by `key` (same order every run)."""
    if len(distractors) != len(MCQ_LETTERS) - 1:
        raise ValueError(f"multiple choice needs exactly 3 distractors, got {len(distractors)}")
    options = [correct, *distractors]
    order = sorted(range(4), key=lambda i: text_seed(key, i))
    options = [options[i] for i in order]
    return options, order.index(0)


SPORT_MCQ_SHOT = mcq_block("What sport does Tiger Woods play?",
                           ["basketball", "golf", "baseball", "football"], "B")


def sport_prompt(athlete: str, fmt: str = "normal", template: str | None = None) -> str:
    """The prompt for one athlete in a named format (or a custom ``{athlete}`` template)."""
    if template is not None:
        if "{athlete}" not in template:
            raise ValueError("a custom template must contain '{athlete}'")
        return template.format(athlete=athlete)
    if fmt in SPORT_TEMPLATES or fmt in PAPER_SPORT_TEMPLATES:
        return {**SPORT_TEMPLATES, **PAPER_SPORT_TEMPLATES}[fmt].format(athlete=athlete)
    if fmt == "mcq":
        raise ValueError("use sport_prompts(..., fmt='mcq'): MC prompts depend on the options")
    raise ValueError(f"unknown sports format {fmt!r}; choose one of {SPORT_FORMATS + PAPER_SPORT_FORMATS}")


def sport_prompts(athletes: list[str], sports: list[str], fmt: str = "normal",
                  candidates: tuple[str, ...] = SPORTS, template: str | None = None) -> PromptSet:
    """Prompts for athletes; the right answer of athlete i is sports[i] (any string in candidates).

    For ``mcq`` the candidates are the letters A-D and the options are the athlete's sport plus
    the other sports (golf fills the fourth slot), in a fixed per-athlete order. ``paper_mcq``: the
    paper's text, letters A-D in the one order `PAPER_MCQ_ORDER` for every athlete.
    """
    if len(athletes) == 0:
        raise ValueError("no athletes given: the fact set is empty")
    unknown = sorted(set(sports) - set(candidates) - {"golf"})
    if unknown:
        raise ValueError(f"unknown sport(s) {unknown}; candidates are {list(candidates)}")
    if fmt == "paper_mcq":
        return PromptSet([sport_prompt(a, fmt) for a in athletes], [[" " + x for x in MCQ_LETTERS]] * len(athletes),
                         [PAPER_MCQ_ORDER.index(s) for s in sports], meta=dict(format=fmt, task="sports"))
    if fmt != "mcq":
        cands = [" " + c for c in candidates]
        return PromptSet([sport_prompt(a, fmt, template) for a in athletes],
                         [cands] * len(athletes), [list(candidates).index(s) for s in sports],
                         meta=dict(format=fmt, task="sports"))
    pool = [*SPORTS, "golf"]
    prompts, correct = [], []
    for athlete, sport in zip(athletes, sports):
        # The options depend only on the athlete, so scoring the true or an injected sport
        # reads the same prompt.
        options, _ = shuffled_options(pool[0], pool[1:], athlete)
        item = mcq_block(f"What sport does {athlete} play?", options)
        prompts.append(SPORT_MCQ_SHOT + "\n" + item)
        correct.append(options.index(sport))
    letters = [" " + x for x in MCQ_LETTERS]
    return PromptSet(prompts, [letters] * len(athletes), correct, meta=dict(format="mcq", task="sports"))


# --------------------------------------------------------------------------- CounterFact

COUNTERFACT_FORMATS = ("prompt", "paraphrase", "neighborhood", "mcq", "paper_mcq")
CF_MCQ_SHOT = mcq_block("Complete the sentence: The capital of France is",
                        ["Berlin", "Madrid", "Paris", "Rome"], "C")
# The paper's CounterFact multiple choice (magikarp01/tasks facts/CounterFactTask.py: `mc_question_format`,
# `create_icl_mc_format`, `CounterFactTask_MC(n_shots=16)` in its evaluations): this text, preceded by
# `PAPER_CF_MCQ_SHOTS` answered questions about other facts. Its option order is random per run; ours is
# fixed per fact (`shuffled_options`), so every run asks the same questions.
PAPER_CF_MCQ_FORMAT = ("Help me answer the following multiple choice question:\n\n{question}\n\nA. {a}\nB. {b}\n"
                       "C. {c}\nD. {d}\n\nPlease respond with the letter of the correct answer, A, B, C, or D. Answer:")
PAPER_CF_MCQ_SHOTS = 16


def _cf_mc_item(row) -> tuple[str, list[str], int]:
    """(question, A-D options, index of the true object) of one CounterFact fact."""
    distractors = [d for d in row.mc_distractors if d.strip() != row.target_true.strip()][:3]
    options, pos = shuffled_options(row.target_true, distractors, row.subject)
    question = getattr(row, "mc_question", None) or f"Complete the sentence: {row.prompt}"
    return question, options, pos


def paper_cf_mcq(question: str, options: list[str], answer_letter: str | None = None) -> str:
    """One item in the paper's CounterFact MCQ text (+ `answer_letter` and a blank line for a shot)."""
    text = PAPER_CF_MCQ_FORMAT.format(question=question, **dict(zip("abcd", (o.strip() for o in options))))
    return text + (f" {answer_letter}\n\n" if answer_letter else "")


def paper_cf_mcq_shots(shots) -> str:
    """The paper's in-context examples: each fact of `shots` (a CounterFact DataFrame) asked and answered."""
    out = []
    for row in shots.itertuples(index=False):
        question, options, pos = _cf_mc_item(row)
        out.append(paper_cf_mcq(question, options, MCQ_LETTERS[pos]))
    return "".join(out)


def counterfact_prompts(facts, fmt: str = "prompt", answer: str = "target_true", shots=None) -> PromptSet:
    """CounterFact prompts. `facts` is a DataFrame from `data.load_counterfact`.

    ``answer`` picks which object counts as correct ('target_true' or 'target_new'); the candidates
    are always [target_true, target_new] for prompt/paraphrase (so the two are compared head to
    head), the neighbourhood's own true answers for neighborhood, and A-D letters for mcq and
    paper_mcq (the paper's text after the in-context examples made from `shots`, a DataFrame of
    other facts: the paper uses 16, `PAPER_CF_MCQ_SHOTS`).
    """
    if len(facts) == 0:
        raise ValueError("no facts given: the fact set is empty")
    if answer not in ("target_true", "target_new"):
        raise ValueError("answer must be 'target_true' or 'target_new'")
    if fmt == "paper_mcq":
        if shots is None or len(shots) == 0:
            raise ValueError("the paper's CounterFact MCQ needs in-context examples: pass shots= (other facts)")
        if set(shots.subject) & set(facts.subject):
            raise ValueError("a shot of the paper's CounterFact MCQ is also asked: keep shots and facts apart")
        prefix = paper_cf_mcq_shots(shots)
    prompts, cands, correct, fact_index = [], [], [], []
    for i, row in enumerate(facts.itertuples(index=False)):
        pair = [row.target_true, row.target_new]
        right = 0 if answer == "target_true" else 1
        if fmt == "prompt":
            items = [(row.prompt, pair, right)]
        elif fmt == "paraphrase":
            items = [(p, pair, right) for p in row.paraphrase_prompts]
        elif fmt == "neighborhood":
            # Neighbours keep their own true answer; the edited object is the rival candidate.
            items = [(p, [a, row.target_new], 0) for p, a in
                     zip(row.neighborhood_prompts, row.neighborhood_answers) if a != row.target_new]
        elif fmt in ("mcq", "paper_mcq"):
            question, options, pos = _cf_mc_item(row)
            new_pos = [o.strip() for o in options].index(row.target_new.strip()) \
                if row.target_new.strip() in [o.strip() for o in options] else None
            if answer == "target_new" and new_pos is None:
                raise ValueError(f"target_new {row.target_new!r} of {row.subject!r} is not an MC option")
            text = (CF_MCQ_SHOT + "\n" + mcq_block(question, options) if fmt == "mcq"
                    else prefix + paper_cf_mcq(question, options))
            items = [(text, [" " + x for x in MCQ_LETTERS], pos if answer == "target_true" else new_pos)]
        else:
            raise ValueError(f"unknown CounterFact format {fmt!r}; choose one of {COUNTERFACT_FORMATS}")
        for p, c, r in items:
            prompts.append(p)
            cands.append(list(c))
            correct.append(r)
            fact_index.append(i)
    return PromptSet(prompts, cands, correct, meta=dict(format=fmt, task="counterfact",
                                                        fact_index=fact_index))
