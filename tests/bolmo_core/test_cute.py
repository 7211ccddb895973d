"""CUTE-style char tasks: generation recipe, TSV compatibility, prompts and scoring."""

import re

import pytest

from bolmo_core import cute


@pytest.fixture(scope="module")
def tasks():
    return cute.load_tasks(n_items=200, seed=0)


def test_every_task_has_items_with_correct_labels(tasks):
    assert set(tasks) == set(cute.CHAR_TASKS)
    for task, items in tasks.items():
        assert len(items) == 200, task
        for it in items:
            word = it.inputs[-1].replace(" ", "")
            assert re.fullmatch("[a-z]{3,}", word), (task, it)
            assert it.label == cute.label_for(task, it.inputs)


def test_task_semantics(tasks):
    contains = tasks["contains_char"]
    yes = sum(it.label == "Yes" for it in contains)
    assert 60 < yes < 140  # 50/50 by a seeded coin
    for it in contains:
        assert (it.inputs[0] in it.inputs[1]) == (it.label == "Yes")
    for it in tasks["swap_char"]:
        c1, c2, w = it.inputs
        assert c1 != c2 and w.count(c1) == 1 and w.count(c2) == 1
        assert sorted(it.label) == sorted(w) and it.label.index(c1) == w.index(c2)
    for it in tasks["ins_char"]:
        x, c, w = it.inputs
        assert c in w and len(it.label) == len(w) + w.count(c)
    assert tasks["spell"][0].label == " ".join(tasks["spell"][0].inputs[0])
    # Frequency order: the first items use the most common words.
    assert tasks["spell"][0].inputs[0] == "the"


def test_seeded_and_deterministic():
    words = cute.word_list(500)
    a = cute.make_items("sub_char", words, 50, seed=0)
    assert a == cute.make_items("sub_char", words, 50, seed=0)
    assert a != cute.make_items("sub_char", words, 50, seed=1)


def test_labels_match_original_cute_rows(tmp_path):
    # Rows from Leukas/CUTE data/ins_char.tsv and del/sub/swap files' layout: input order is CUTE's.
    (tmp_path / "ins_char.tsv").write_text(
        "input1\tinput2\tinput3\tlabel\nm\th\tthe\tthme\nz\tl\tall\talzlz\n"
    )
    items = cute.read_tsv(tmp_path / "ins_char.tsv", "ins_char")
    assert [cute.label_for("ins_char", it.inputs) for it in items] == ["thme", "alzlz"]
    assert cute.label_for("sub_char", ("a", "b", "alphabet")) == "blphbbet"
    assert cute.label_for("swap_char", ("l", "b", "alphabet")) == "abphalet"
    assert cute.label_for("del_char", ("l", "hello")) == "heo"


def test_tsv_roundtrip_and_drop_in(tmp_path, tasks):
    for task, items in tasks.items():
        cute.write_tsv(items, tmp_path / f"{task}.tsv")
        assert cute.read_tsv(tmp_path / f"{task}.tsv", task) == items
    header = (tmp_path / "sub_char.tsv").read_text().splitlines()[0]
    assert header == "input1\tinput2\tinput3\tlabel"
    # A folder with a file for one task: that task is read, the others regenerated.
    (tmp_path / "other").mkdir()
    cute.write_tsv(tasks["spell"][:7], tmp_path / "other" / "spell.tsv")
    loaded = cute.load_tasks(("spell", "del_char"), n_items=20, data_dir=tmp_path / "other")
    assert loaded["spell"] == tasks["spell"][:7] and len(loaded["del_char"]) == 20


def test_bad_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "del_char.tsv"
    bad.write_text("input1\tlabel\na\tb\n")
    with pytest.raises(cute.CuteError, match="header"):
        cute.read_tsv(bad, "del_char")
    bad.write_text("input1\tinput2\tlabel\na\tab\n")
    with pytest.raises(cute.CuteError, match="line 2: 2 columns"):
        cute.read_tsv(bad, "del_char")
    with pytest.raises(cute.CuteError, match="unknown"):
        cute.load_tasks(("spelling",))
    with pytest.raises(cute.CuteError, match="cannot be read"):
        cute.read_tsv(tmp_path / "missing.tsv", "spell")


def test_prompt_layout():
    item = cute.CuteItem("del_char", ("o", "book"), "bk")
    p = cute.prompt(item)
    assert p.endswith('Question: Delete every instance of "o" in "book". Answer: "')
    shots = re.findall(r'^(\d)\. .*Answer: "(.*)"$', p, flags=re.M)
    assert [s[0] for s in shots] == ["1", "2", "3", "4"]
    assert shots[1][1] == "heo"


def test_parse_answer():
    assert cute.parse_answer('h e l l o"\n5. Spell') == "h e l l o"
    assert cute.parse_answer(' Yes " and more') == "Yes"
    assert cute.parse_answer("no closing quote") == "no closing quote"


def _oracle(prompts, max_new_bytes):
    """Answers each question by parsing it back out of the prompt (exercises the prompt layout)."""
    out = []
    for p in prompts:
        q = p.rsplit("Question: ", 1)[1]
        for task in cute.CHAR_TASKS:
            n, template, _ = cute._TASKS[task]
            pattern = (
                re.escape(template)
                .replace(r"\{0\}", "(.*?)")
                .replace(r"\{1\}", "(.*?)")
                .replace(r"\{2\}", "(.*?)")
            )
            m = re.fullmatch(pattern + r' Answer: "', q)
            if m and (task == "spell_inverse") == (" " in m.group(1)) and cute._INSTRUCTIONS[task] in p:
                out.append(cute.label_for(task, m.groups()) + '" because')
                break
        else:
            out.append("?")
    return out


def test_run_tasks_scores_exact_match(tasks):
    small = {t: items[:10] for t, items in tasks.items()}
    res = cute.run_tasks(_oracle, small, batch_size=4)
    assert all(r["accuracy"] == 1.0 and r["n"] == 10 for r in res.values())
    wrong = cute.run_tasks(lambda ps, n: ['x"'] * len(ps), small)
    assert cute.mean_accuracy(wrong) == 0.0
    assert res["spell"]["examples"][0] == {"inputs": ["the"], "label": "t h e", "prediction": "t h e"}


def test_wiki_word_source():
    words = cute.word_list(300, source="wiki")
    assert len(words) == 300 and words[0] == "the"
    assert all(re.fullmatch("[a-z]{3,}", w) for w in words)
    with pytest.raises(cute.CuteError):
        cute.word_list(10, source="google")
