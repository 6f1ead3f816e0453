"""Built-in tasks (data/tasks.py) and SFT packing / accuracy evaluation (data/sft.py)."""

import json
import math
import random

import pytest
import torch

from data import sft, tasks
from data.tasks import TASKS, Example, check, get_task, load_jsonl_examples, make_examples, reward
from trainer.errors import ConfigError, DataError, UserError


class ByteTok:
    """Byte-level stand-in with the project tokenizer's interface."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out.append(b"<eos>")
            elif i < 256:
                out.append(bytes([i]))
        return b"".join(out).decode("utf-8", errors="replace")


TOK = ByteTok()

PARALLEL = [
    {"id": f"p{i}", "en": f"The cat number {i} sleeps.", "fr": f"Le chat numéro {i} dort.",
     "de": f"Die Katze Nummer {i} schläft."}
    for i in range(20)
] + [
    {"id": "long", "en": "x" * 81, "fr": "short", "de": "kurz"},  # en side too long
    {"id": "nofr", "en": "Only English  here.", "fr": None, "de": "Nur   Deutsch hier."},
]

BUILTIN = ["add", "reverse", "sort", "copy"]


# ------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", BUILTIN + ["translate"])
def test_determinism(name):
    a = make_examples([name], 30, seed=1, parallel=PARALLEL)
    b = make_examples([name], 30, seed=1, parallel=PARALLEL)
    c = make_examples([name], 30, seed=2, parallel=PARALLEL)
    assert [(e.prompt, e.answer, e.meta) for e in a] == [(e.prompt, e.answer, e.meta) for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]


def test_no_global_rng_use():
    random.seed(0)
    before = random.random()
    random.seed(0)
    make_examples(BUILTIN, 20, seed=3)
    assert random.random() == before


def test_mixing_round_robin_and_independent_streams():
    exs = make_examples(BUILTIN, 12, seed=0)
    assert [e.meta["task"] for e in exs] == BUILTIN * 3
    # a task's stream does not depend on the other tasks in the mix
    alone = make_examples(["add"], 3, seed=0)
    assert [e.prompt for e in exs if e.meta["task"] == "add"] == [e.prompt for e in alone]


def test_prompt_format_and_answers():
    for e in make_examples(BUILTIN, 200, seed=5):
        assert e.prompt.startswith("Q: ") and e.prompt.endswith("\nA:")
        assert e.answer.startswith(" ") and e.answer.strip() == e.answer[1:] == e.meta["target"]
        q = e.prompt[3:-3]
        t = e.meta["task"]
        if t == "add":
            a, b = q.rstrip("=").split("+")
            assert int(e.answer) == int(a) + int(b)
            assert len(a) <= 3 and len(b) <= 3
        elif t == "reverse":
            assert e.meta["target"] == q.split(" ", 1)[1][::-1]
        elif t == "sort":
            s = q.split(" ", 1)[1]
            assert e.meta["target"] == "".join(sorted(s)) and (s.isdigit() or s.isalpha())
        elif t == "copy":
            assert e.meta["target"] == q.split(" ", 1)[1]


def test_add_digits_configurable():
    exs = make_examples(["add:5"], 200, seed=0)
    assert max(max(len(str(e.meta["a"])), len(str(e.meta["b"]))) for e in exs) == 5
    assert all(e.meta["a"] < 10**5 and e.meta["b"] < 10**5 for e in exs)
    exs1 = make_examples([tasks.AddTask(max_digits=1)], 50, seed=0)
    assert all(e.meta["a"] < 10 and e.meta["b"] < 10 for e in exs1)
    assert max(len(e.meta["source"]) for e in make_examples(["reverse:12"], 200, seed=0)) == 12


def test_bad_specs():
    with pytest.raises(ConfigError, match="nope"):
        make_examples(["nope"], 1, seed=0)
    with pytest.raises(ConfigError, match="add:x"):
        get_task("add:x")
    with pytest.raises(ConfigError):
        make_examples(["add"], 1, seed=0, split="test")
    with pytest.raises(DataError, match="parallel"):
        make_examples(["translate"], 1, seed=0)
    assert make_examples(["add"], 0, seed=0) == []


# ------------------------------------------------------------------------------------ checkers
@pytest.mark.parametrize("name", BUILTIN + ["translate"])
def test_checkers_accept_right_reject_wrong(name):
    for e in make_examples([name], 40, seed=7, parallel=PARALLEL):
        target = e.meta["target"]
        for good in (e.answer, target, f"  {target}  ", f"{target}\nQ: 1+1=", f"{target}<eos>junk",
                     f" {target}</s>"):
            assert check(good, e), (good, e)
            assert reward(good, e) == 1.0
        for bad in ("", target + "x", "x" + target, target[:-1], f"\n{target}", target[::-1] + "z"):
            assert not check(bad, e), (bad, e)
            r = reward(bad, e)
            assert 0.0 <= r < 1.0
        # an answer that only differs in one character gets partial credit (but never 1)
        if len(target) > 1:
            wrong = target[:-1] + ("0" if target[-1] != "0" else "1")
            assert not check(wrong, e) and 0.0 < reward(wrong, e) < 1.0


def test_permutation_is_not_full_reward():
    e = make_examples(["sort"], 1, seed=0)[0]
    perm = e.meta["target"][::-1]
    if perm != e.meta["target"]:
        assert not check(perm, e) and reward(perm, e) < 1.0


def test_specific_checks():
    e = TASKS["add"].sample(random.Random(0))
    assert e.meta["task"] == "add"
    add = Example("Q: 12+7=\nA:", " 19", {"task": "add", "target": "19"})
    assert check(" 19\n", add) and check("19<|endoftext|>", add)
    assert not check("1 9", add) and not check("20", add)
    assert reward("18", add) == pytest.approx(0.25)  # right-aligned: "1" matches, "8" != "9" -> 0.5 * 1/2
    assert reward("abc", add) == 0.0


def test_translate_task():
    pairs = tasks.mine_pairs(PARALLEL)
    ids = {p[0] for p in pairs}
    assert "long" not in {p[0] for p in pairs if p[1] == "en" or p[2] == "en"}
    assert ("long", "de", "fr", "kurz", "short") in pairs  # the short sides of a row are still used
    assert ("nofr", "en", "de", "Only English here.", "Nur Deutsch hier.") in pairs  # whitespace normalized
    assert all(len(p[3]) <= 80 and len(p[4]) <= 80 for p in pairs) and "p0" in ids
    exs = make_examples(["translate:en-fr"], 20, seed=0, parallel=PARALLEL)
    for e in exs:
        row = next(r for r in PARALLEL if r["id"] == e.meta["id"])
        assert e.prompt == f"Q: translate en to fr: {row['en']}\nA:"
        assert e.answer == " " + row["fr"]
        assert check(" " + row["fr"].replace(" ", "   ") + "\n", e)  # whitespace-normalized exact match
        assert not check(row["fr"].lower().replace("le", "la"), e)
    e = exs[0]
    near = e.meta["target"][:-1]
    assert 0.0 < reward(near, e) < 1.0  # partial credit: char-level F1
    assert reward(e.meta["target"], e) == 1.0
    with pytest.raises(ConfigError):
        get_task("translate:en", parallel=PARALLEL)
    with pytest.raises(DataError, match="en->ja"):
        make_examples(["translate:en-ja"], 1, seed=0, parallel=PARALLEL)


# ------------------------------------------------------------------------------------ splits
@pytest.mark.parametrize("spec", ["add", "add:1", "reverse", "sort", "copy", "translate"])
def test_train_eval_disjoint(spec):
    train = make_examples([spec], 400, seed=0, parallel=PARALLEL, split="train")
    ev = make_examples([spec], 100, seed=0, parallel=PARALLEL, split="eval")
    assert len(ev) == 100
    assert not {e.prompt for e in train} & {e.prompt for e in ev}
    assert not {e.meta["group"] for e in train} & {e.meta["group"] for e in ev}
    if spec.startswith("translate"):  # no paragraph leaks between splits in any direction
        assert not {e.meta["id"] for e in train} & {e.meta["id"] for e in ev}
    if spec.startswith("add"):  # commuted operands stay in one split
        seen = {(e.meta["a"], e.meta["b"]) for e in train}
        assert not any((e.meta["b"], e.meta["a"]) in seen for e in ev)


def test_translate_rows_sharing_a_text_stay_in_one_split():
    """A paragraph repeated on several help pages (different rows) must not be in both splits."""
    from data.corpus import load_parallel

    rows = [{"id": f"r{i}", "en": f"sentence {i}", "fr": f"phrase {i}"} for i in range(40)]
    rows += [{"id": f"dup{i}", "en": f"other {i}", "fr": f"phrase {i}"} for i in range(40)]  # same fr as r{i}
    t = tasks.TranslateTask(rows)
    for i in range(40):
        assert t._row_groups()[f"dup{i}"] == t._row_groups()[f"r{i}"]
    for parallel in (rows, load_parallel()):  # and on the bundled corpus
        t = tasks.TranslateTask(parallel)
        tr, ev = t._pool("train", 0.1), t._pool("eval", 0.1)
        texts = lambda pool: {(p[1], p[3]) for p in pool} | {(p[2], p[4]) for p in pool}  # noqa: E731
        assert tr and ev and not texts(tr) & texts(ev)


def test_train_eval_disjoint_across_seeds():
    train = {e.prompt for s in range(3) for e in make_examples(BUILTIN, 200, seed=s)}
    ev = {e.prompt for s in range(3) for e in make_examples(BUILTIN, 100, seed=s, split="eval")}
    assert train and ev and not train & ev


def test_split_examples_for_user_data():
    exs = [Example(f"p{i}", " r", {"task": "jsonl", "target": "r"}) for i in range(200)]
    tr, ev = tasks.split_examples(exs, "train"), tasks.split_examples(exs, "eval")
    assert len(tr) + len(ev) == 200 and ev and not {e.prompt for e in tr} & {e.prompt for e in ev}


# ------------------------------------------------------------------------------------ jsonl
def _write(path, lines):
    path.write_text("".join(lines))
    return path


def test_jsonl_loading(tmp_path):
    recs = [{"prompt": "Q: capital of France?\nA:", "response": " Paris"},
            {"prompt": "Write two lines:", "response": " one\ntwo", "extra": 1}]
    p = _write(tmp_path / "u.jsonl", [json.dumps(r) + "\n" for r in recs])
    exs = load_jsonl_examples(p, cache_dir=str(tmp_path / "cache"))
    assert [(e.prompt, e.answer) for e in exs] == [(r["prompt"], r["response"]) for r in recs]
    assert exs[0].meta["task"] == "jsonl"
    assert check(" Paris\nmore", exs[0]) and not check("paris", exs[0])
    assert check(" one\ntwo<eos>", exs[1]) and not check(" one", exs[1])  # multi-line answers kept whole
    assert reward("Pari", exs[0]) < 1.0


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    ('{"prompt": "a"}\n', "'response'"),
    ('{"question": "a", "response": "b"}\n', "'prompt'"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "record 2: field 'response'"),
    ('{"prompt": "a", "response": 3}\n', "'response'"),
    ('{"prompt": "a"\n', "JSON"),
    ("", "no records"),
])
def test_jsonl_errors(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    if content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=match) as ei:
        load_jsonl_examples(p, cache_dir=str(tmp_path / "cache"))
    msg = str(ei.value)
    assert isinstance(ei.value, UserError) and str(p) in msg and "\n" not in msg


# ------------------------------------------------------------------------------------ SFT encoding
def test_encode_example_masks_prompt():
    ex = Example("Q: 1+2=\nA:", " 3", {"task": "add", "target": "3"})
    ids, labels = sft.encode_example(TOK, ex)
    p, r = TOK.encode(ex.prompt), TOK.encode(ex.answer)
    assert ids == [TOK.bos_id] + p + r + [TOK.eos_id]
    assert labels == [-100] * (1 + len(p)) + r + [TOK.eos_id]


def test_pack_shift_token_by_token():
    ex = Example("Q:", " ab", {"task": "copy", "target": "ab"})
    out = sft.pack_sft(TOK, [ex], block_size=8)
    Q, C, SP, A, B = (ord(c) for c in "Q: ab")
    bos, eos, pad = TOK.bos_id, TOK.eos_id, TOK.pad_id
    # ids    = bos Q  :  ' ' a  b  eos      (prompt "Q:", response " ab")
    assert out["input_ids"].tolist() == [[bos, Q, C, SP, A, B, pad, pad]]
    assert out["labels"].tolist() == [[-100, -100, SP, A, B, eos, -100, -100]]
    assert set(out) == {"input_ids", "labels"} and out["input_ids"].dtype == torch.long
    assert out.n_examples == 1 and out.n_dropped == 0 and out.n_rows == 1 and out.n_target_tokens == 4


def test_pack_two_examples_no_cross_boundary_loss():
    e1 = Example("Q:", " a", {})
    e2 = Example("R:", " b", {})
    out = sft.pack_sft(TOK, [e1, e2], block_size=12, order="input")
    bos, eos, pad = TOK.bos_id, TOK.eos_id, TOK.pad_id
    Q, R, C, SP, A, B = (ord(c) for c in "QR: ab")
    # e1 ids = bos Q : ' ' a eos -> inputs bos Q : ' ' a ; targets (shifted) -100 -100 ' ' a eos
    assert out["input_ids"].tolist() == [[bos, Q, C, SP, A, bos, R, C, SP, B, pad, pad]]
    # e1's eos is its last target (predicted from 'a'); the first target after e2's bos is its prompt -> -100
    assert out["labels"].tolist() == [[-100, -100, SP, A, eos, -100, -100, SP, B, eos, -100, -100]]
    assert out.rows == [[0, 1]]
    assert sft.pack_sft(TOK, [e1, e2], block_size=10).n_rows == 1  # 5 + 5 positions fit exactly


def test_pack_many_examples():
    exs = make_examples(BUILTIN, 300, seed=0)
    long = Example("Q: " + "x" * 200 + "\nA:", " y", {"task": "copy"})
    exs.insert(17, long)
    block = 128
    out = sft.pack_sft(TOK, exs, block)
    assert out.n_dropped == 1 and out.n_examples == 300
    assert out["input_ids"].shape == out["labels"].shape == (out.n_rows, block)
    # every example except the over-long one is packed exactly once
    placed = sorted(i for row in out.rows for i in row)
    assert placed == [i for i in range(len(exs)) if i != 17]
    # rows are exactly the shifted concatenation of their examples; padding carries no loss
    total = 0
    for r, row in enumerate(out.rows):
        inp, tgt = [], []
        for i in row:
            ids, labels = sft.encode_example(TOK, exs[i])
            inp += ids[:-1]
            tgt += labels[1:]
        total += len(inp)
        assert out["input_ids"][r, :len(inp)].tolist() == inp
        assert out["labels"][r, :len(tgt)].tolist() == tgt
        assert (out["input_ids"][r, len(inp):] == TOK.pad_id).all()
        assert (out["labels"][r, len(tgt):] == -100).all()
    ids = out["input_ids"]
    labels = out["labels"]
    assert (labels[ids == TOK.bos_id] == -100).all()  # each example's first target is a prompt token
    assert not (labels == TOK.bos_id).any() and not (ids == TOK.eos_id).any()
    n_targets = sum(len(TOK.encode(e.answer)) + 1 for i, e in enumerate(exs) if i != 17)
    assert int((labels != -100).sum()) == n_targets == out.n_target_tokens
    assert out.n_rows <= math.ceil(total / block) + 2  # near-minimal row count
    assert out.fill > 0.9
    online = sft.pack_sft(TOK, exs, block, order="input")  # input order kept: a little less dense
    assert sorted(i for row in online.rows for i in row) == placed
    assert all(row == sorted(row) for row in online.rows)
    assert online.n_rows <= math.ceil(total / block) + 3
    again = sft.pack_sft(TOK, exs, block)
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["labels"], labels)


def test_pack_exact_fit_and_empty():
    ex = Example("Q:", " ab", {})  # 7 ids -> 6 positions
    assert sft.pack_sft(TOK, [ex], block_size=6).n_dropped == 0
    assert sft.pack_sft(TOK, [ex], block_size=5).n_dropped == 1
    empty = sft.pack_sft(TOK, [], block_size=16)
    assert empty["input_ids"].shape == (0, 16) and empty.n_rows == 0


def test_pack_loss_with_real_cross_entropy():
    """labels line up with model(input_ids, targets=labels): an oracle that reads only input_ids and puts all
    mass on each example's true next token gets ~zero loss, and exactly the response tokens (+ EOS) count."""
    exs = make_examples(["add"], 5, seed=0)
    out = sft.pack_sft(TOK, exs, 64)
    next_of, n_trained = {}, 0  # example prefix -> its next token
    for ex in exs:
        ids, labels = sft.encode_example(TOK, ex)
        for j in range(len(ids) - 1):
            next_of[tuple(ids[:j + 1])] = ids[j + 1]
        n_trained += sum(label != -100 for label in labels)
    logits = torch.full((*out["labels"].shape, TOK.vocab_size), -1e4)
    for r, row in enumerate(out["input_ids"].tolist()):
        start = 0
        for t, token in enumerate(row):
            start = t if token == TOK.bos_id else start  # every example starts with BOS
            nxt = next_of.get(tuple(row[start:t + 1]))
            if nxt is not None:
                logits[r, t, nxt] = 1e4
    assert int((out["labels"] != -100).sum()) == n_trained
    loss = torch.nn.functional.cross_entropy(logits.view(-1, TOK.vocab_size), out["labels"].view(-1),
                                             ignore_index=-100)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


# ------------------------------------------------------------------------------------ accuracy
class OracleModel(torch.nn.Module):
    """generate() answers correctly for prompts in `right`, with a wrong answer otherwise."""

    def __init__(self, answers, right):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.right, self.calls = answers, right, []

    def generate(self, idx, max_new_tokens, temperature=1.0, top_p=1.0, eos_id=None, generator=None):
        self.calls.append((idx.shape, temperature, eos_id))
        rows = []
        for row in idx.tolist():
            assert row[0] == TOK.bos_id
            prompt = TOK.decode(row[1:])
            ans = self.answers[prompt] if prompt in self.right else " wrong"
            new = (TOK.encode(ans) + [eos_id] + TOK.encode(" junk after eos"))[:max_new_tokens]
            rows.append(row + new)
        width = max(map(len, rows))
        return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])


def test_evaluate_accuracy_with_stand_in_model():
    exs = make_examples(BUILTIN, 40, seed=0, split="eval")
    answers = {e.prompt: e.answer for e in exs}
    right = {e.prompt for i, e in enumerate(exs) if i % 4 != 3}  # all but the "copy" examples
    model = OracleModel(answers, right)
    model.train()
    acc = sft.evaluate_accuracy(model, TOK, exs, max_new_tokens=32, batch_size=4)
    expected = sum(e.prompt in right for e in exs) / len(exs)
    assert acc == pytest.approx(expected) and 0 < acc < 1
    assert model.training  # mode restored
    assert all(t == 0.0 and eos == TOK.eos_id for _, t, eos in model.calls)
    assert all(shape[0] <= 4 for shape, _, _ in model.calls)
    res = sft.evaluate(model, TOK, exs, max_new_tokens=32, batch_size=64)
    assert res["per_task"]["copy"] == 0.0 and res["per_task"]["add"] == 1.0
    assert res["n"] == 40 and expected <= res["reward"] < 1.0
    assert [c.strip() for c, e in zip(res["completions"], exs) if e.prompt in right] == \
        [e.meta["target"] for e in exs if e.prompt in right]


def test_evaluate_truncated_generation_and_empty():
    exs = make_examples(["copy"], 6, seed=1)
    model = OracleModel({e.prompt: e.answer for e in exs}, {e.prompt for e in exs})
    assert sft.evaluate_accuracy(model, TOK, exs, max_new_tokens=64) == 1.0
    assert sft.evaluate_accuracy(model, TOK, exs, max_new_tokens=2) == 0.0  # answer cut short
    assert sft.evaluate_accuracy(model, TOK, [], max_new_tokens=8) == 0.0
