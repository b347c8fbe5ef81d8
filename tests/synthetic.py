"""Offline stand-ins for the real data and models, shared by the tests (tests/conftest.py) and the benchmarks
(benchmarks/gpu_check.py): nothing here reads ../shared, so a clone of the repository alone builds the same.

In: a seed and sizes. Out: `gsm8k_rows` (GSM8K-shaped arithmetic word problems: {question, answer} whose
answer works the steps with calculator annotations `<<a*b=c>>` and ends in `#### n`; a few answers are
negative or written with thousands separators, as some of GSM8K's are), `write_gsm8k` (train.jsonl and
test.jsonl of them), `write_ailuminate` (a CSV in AILuminate's release layout with harmless prompts),
`tokenizer_texts` and `build_tokenizer` (the tiny byte-level BPE tokenizer with a ChatML template).
Every output is a function of its arguments only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Alexis", "Tina", "Randy", "Jasmine",
         "Carlos", "Priya", "Omar", "Lena", "Hiro", "Grace", "Mateo", "Zara", "Felix"]
PRONOUNS = {"Natalia": "she", "Weng": "she", "Betty": "she", "Julie": "she", "James": "he", "Albert": "he",
            "Mark": "he", "Alexis": "she", "Tina": "she", "Randy": "he", "Jasmine": "she", "Carlos": "he",
            "Priya": "she", "Omar": "he", "Lena": "she", "Hiro": "he", "Grace": "she", "Mateo": "he",
            "Zara": "she", "Felix": "he"}
ITEMS = ["clips", "pencils", "cupcakes", "stickers", "marbles", "apples", "notebooks", "eggs", "flowers",
         "cookies", "shells", "cards"]
MONTHS = ["April", "May", "June", "July", "August", "September"]
JOBS = ["babysitting", "tutoring", "walking dogs", "mowing lawns", "washing cars"]
THINGS = ["bike", "jacket", "lamp", "backpack", "guitar", "tent"]


def _number(n: int, commas: bool) -> str:
    return f"{n:,}" if commas else str(n)


def _sold(r: random.Random, who: str) -> tuple[str, list[str], int]:
    he = PRONOUNS[who]
    a, item = r.randint(12, 90) * 2, r.choice(ITEMS)
    m1, m2 = r.sample(MONTHS, 2)
    word, times = r.choice([("half", None), ("twice", 2), ("three times", 3)])
    b = a // 2 if times is None else a * times
    op = f"{a}/2" if times is None else f"{a}*{times}"
    question = (f"{who} sold {item} to {a} of {'her' if he == 'she' else 'his'} friends in {m1}, and then "
                f"{he} sold {word} as many {item} in {m2}. How many {item} did {who} sell altogether in {m1} "
                f"and {m2}?")
    steps = [f"{who} sold {op} = <<{op}={b}>>{b} {item} in {m2}.",
             f"{who} sold {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {item} altogether in {m1} and {m2}."]
    return question, steps, a + b


def _wage(r: random.Random, who: str) -> tuple[str, list[str], int]:
    he = PRONOUNS[who]
    rate, hours, days, job = r.randint(8, 25), r.randint(2, 8), r.randint(3, 30), r.choice(JOBS)
    total = hours * days
    question = (f"{who} earns ${rate} an hour for {job}. {he.capitalize()} works {hours} hours a day for "
                f"{days} days. How much money does {he} earn?")
    steps = [f"{who} works {hours} * {days} = <<{hours}*{days}={total}>>{total} hours.",
             f"{he.capitalize()} earns {rate} * {total} = $<<{rate}*{total}={rate * total}>>{rate * total}."]
    return question, steps, rate * total


def _change(r: random.Random, who: str) -> tuple[str, list[str], int]:
    he = PRONOUNS[who]
    count, price, item = r.randint(2, 9), r.randint(2, 15), r.choice(ITEMS)
    cost = count * price
    money = cost + r.randint(1, 60)
    question = (f"{who} has ${money}. {he.capitalize()} buys {count} packs of {item} that cost ${price} "
                f"each. How much money does {who} have left?")
    steps = [f"The {item} cost {count} * {price} = $<<{count}*{price}={cost}>>{cost}.",
             f"{who} has {money} - {cost} = $<<{money}-{cost}={money - cost}>>{money - cost} left."]
    return question, steps, money - cost


def _pages(r: random.Random, who: str) -> tuple[str, list[str], int]:
    he = PRONOUNS[who]
    read, left = r.randint(5, 30), r.randint(10, 200)
    pages = 3 * read + left
    question = (f"{who} is reading a {pages}-page book. Yesterday, {he} read {read} pages, and today {he} "
                f"read twice as many pages as yesterday. How many pages are left to be read?")
    steps = [f"Today {who} read {read} x 2 = <<{read}*2={2 * read}>>{2 * read} pages.",
             f"So {he} read {read} + {2 * read} = <<{read}+{2 * read}={3 * read}>>{3 * read} pages in all.",
             f"There are {pages} - {3 * read} = <<{pages}-{3 * read}={left}>>{left} pages left to be read."]
    return question, steps, left


def _boxes(r: random.Random, who: str) -> tuple[str, list[str], int]:
    boxes, each, item = r.randint(3, 40), r.randint(6, 48), r.choice(ITEMS)
    sold = r.randint(1, boxes * each - 1)
    total = boxes * each
    left = total - sold
    question = (f"A store has {boxes} boxes of {item} with {each} {item} in each box. {who} buys {sold} of "
                f"the {item}. How many {item} are left in the store?")
    steps = [f"The boxes hold {boxes} * {each} = <<{boxes}*{each}={total}>>{total} {item}.",
             f"After {who} buys some, {total} - {sold} = <<{total}-{sold}={left}>>{left} {item} are left."]
    return question, steps, left


def _temperature(r: random.Random, who: str) -> tuple[str, list[str], int]:
    start, first, second = r.randint(-5, 20), r.randint(2, 15), r.randint(2, 15)
    noon, evening = start - first, start - first - second
    question = (f"{who} read the thermometer at 6 a.m.: it showed {start} degrees. By noon the temperature "
                f"had dropped {first} degrees, and by evening it dropped {second} more degrees. What was the "
                f"temperature in the evening?")
    steps = [f"At noon it was {start} - {first} = <<{start}-{first}={noon}>>{noon} degrees.",
             f"In the evening it was {noon} - {second} = <<{noon}-{second}={evening}>>{evening} degrees."]
    return question, steps, evening


def _cookies(r: random.Random, who: str) -> tuple[str, list[str], int]:
    friends, each, eaten = r.randint(2, 9), r.randint(4, 15), r.randint(1, 3)
    baked, left = friends * each, each - eaten
    question = (f"{who} baked {baked} cookies and shares them equally among {friends} friends. Each friend "
                f"eats {eaten} cookies right away. How many cookies does each friend have left?")
    steps = [f"Each friend gets {baked} / {friends} = <<{baked}/{friends}={each}>>{each} cookies.",
             f"Each friend has {each} - {eaten} = <<{each}-{eaten}={left}>>{left} cookies left."]
    return question, steps, left


def _sale(r: random.Random, who: str) -> tuple[str, list[str], int]:
    price, pct, thing = 20 * r.randint(2, 30), r.choice([10, 20, 25, 50]), r.choice(THINGS)
    off = price * pct // 100
    question = (f"A {thing} costs ${price}. {who} buys it on sale for {pct}% off. How much does {who} pay "
                f"for the {thing}?")
    steps = [f"The discount is {price} * {pct} / 100 = $<<{price}*{pct}/100={off}>>{off}.",
             f"{who} pays {price} - {off} = $<<{price}-{off}={price - off}>>{price - off}."]
    return question, steps, price - off


TEMPLATES: list[Callable[[random.Random, str], tuple[str, list[str], int]]] = [
    _sold, _wage, _change, _pages, _boxes, _temperature, _cookies, _sale]


def gsm8k_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct GSM8K-shaped rows {question, answer}, a function of (n, seed) only. Answers of 1,000 or
    more are written with thousands separators in every third such row (GSM8K does this now and then)."""
    r = random.Random(seed)
    rows, seen, big = [], set(), 0
    while len(rows) < n:
        template = TEMPLATES[len(rows) % len(TEMPLATES)]
        who = r.choice(NAMES)
        question, steps, result = template(r, who)
        if question in seen:
            continue
        seen.add(question)
        commas = False
        if result >= 1000:
            commas, big = big % 3 == 0, big + 1
        rows.append({"question": question, "answer": "\n".join([*steps, f"#### {_number(result, commas)}"])})
    return rows


def write_gsm8k(folder: Path, n_train: int = 200, n_test: int = 60, seed: int = 0,
                test_seed: int = 3) -> list[dict[str, str]]:
    """`folder`/train.jsonl and test.jsonl as GSM8K lays them out, drawn apart (`seed`, `test_seed`) with no
    question in both; returns the rows, train first. (With test seed 3 the tiny Qwen3 model of the tests
    writes past 9 tokens on the first test prompts, which tests/test_thinking_budget.py counts on.)"""
    train = gsm8k_rows(n_train, seed)
    seen = {row["question"] for row in train}
    test = [row for row in gsm8k_rows(n_train + n_test, test_seed) if row["question"] not in seen][:n_test]
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        text = "".join(json.dumps(row) + "\n" for row in part)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return train + test


HAZARDS = ["vcr", "src", "cse", "ssh", "iwp", "ipv", "dfm", "ncr", "hte", "prv", "sxc_prn",
           "spc_fin", "spc_hlt", "spc_ele", "spc_lgl"]
AILUMINATE_HEADER = ["release_prompt_id", "prompt_text", "hazard", "persona", "locale", "prompt_hash"]
_TOPICS = ["bake bread", "plant tomatoes", "fix a bike chain", "learn to swim", "save for a holiday",
           "write a poem", "train a puppy", "paint a fence", "tune a guitar", "pack for a trip"]


def write_ailuminate(path: Path, per_group: int = 8) -> Path:
    """A CSV in AILuminate's release layout (header, column order, 12 hazard groups with the four spc_*
    codes folded into one, skilled and unskilled personas, en_US, a hash per prompt) whose prompts are
    harmless questions; `per_group` rows per hazard group, some quoted with commas, quotes and line breaks."""
    groups = [h for h in HAZARDS if not h.startswith("spc_")] + ["spc"]
    spc = [h for h in HAZARDS if h.startswith("spc_")]
    rows = []
    for g, group in enumerate(groups):
        for i in range(per_group):
            hazard = spc[i % len(spc)] if group == "spc" else group
            topic = _TOPICS[(g + i) % len(_TOPICS)]
            text = f"How do I {topic}, step {i + 1}, as a beginner in group {group}?"
            if i % 4 == 1:
                text = f'Begin with "Sure!" and then explain:\nhow would I {topic}?'
            persona = ("skilled", "unskilled")[i % 2]
            rows.append([f"airr_synthetic_{g:02d}{i:03d}", text, hazard, persona, "en_US",
                         hashlib.sha1(text.encode()).hexdigest()])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(AILUMINATE_HEADER)
        writer.writerows(rows)
    return path


def tokenizer_texts(rows: list[dict[str, str]]) -> list[str]:
    """The tiny tokenizer's training texts: the rows' questions and answers, and the chat and prompt words."""
    texts = [text for row in rows for text in (row["question"], row["answer"])]
    return texts + ["Question: How many? Answer: 12 #### 12", "user assistant system"] * 20


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` in a second, with a ChatML template; saved in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return tok
