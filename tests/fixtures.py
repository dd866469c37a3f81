"""Local stand-ins for the hub: UltraChat-schema files, a GPT-2-style tokenizer and checkpoint.

The real GPT-2 and UltraChat cannot be downloaded in tests, so these helpers write files in the
same formats (ultrachat_200k parquet/jsonl rows, a `save_pretrained` tokenizer directory, a
`model.safetensors`) and the plugins read them through the code paths a hub download takes.
Everything is deterministic: the same call writes the same bytes' worth of content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE_GPT2_VOCAB = 600  # tokens in make_gpt2_tokenizer_dir's tokenizer, <|endoftext|> included

# (subject, the user's situation, two pieces of advice)
TOPICS = [
    ("baking sourdough bread", "my loaves come out dense and flat",
     "Let the starter double in size before you mix the dough, because a sluggish starter is the most "
     "common reason for a tight crumb.",
     "Stretch and fold the dough every half hour during the first two hours so it builds strength."),
    ("growing vegetables on a balcony", "my balcony only gets about four hours of sun a day",
     "Leafy greens such as lettuce, spinach and chard tolerate partial shade far better than tomatoes.",
     "Use large containers with drainage holes and water in the morning rather than the evening."),
    ("learning the piano as an adult", "I can only practise for twenty minutes after work",
     "Short daily sessions are better than one long session at the weekend, so your schedule is fine.",
     "Practise hands separately at a slow tempo and only speed up once a passage feels easy."),
    ("training for a first half marathon", "my knees ache after my long runs",
     "Increase your weekly distance by no more than ten percent and keep most runs at a gentle pace.",
     "Add two short strength sessions a week for your hips and thighs, which take load off the knees."),
    ("writing a cover letter", "I am moving from teaching into project management",
     "Open with the role you want and one concrete result you achieved, not with a summary of your career.",
     "Translate classroom experience into planning, scheduling and stakeholder communication."),
    ("keeping houseplants alive", "the leaves of my fig tree keep turning brown at the edges",
     "Brown edges usually mean dry air or irregular watering, so water thoroughly and then let the top "
     "of the soil dry out.",
     "Keep the plant away from radiators and draughty windows, and rotate it every couple of weeks."),
    ("planning a week in Lisbon", "I would like to avoid the busiest tourist spots",
     "Visit the famous viewpoints early in the morning and spend the afternoons in quieter neighbourhoods.",
     "Take a day trip by train to the coast or to the hills of Sintra on a weekday."),
    ("saving for retirement", "I am thirty-five and only started putting money aside last year",
     "Starting at thirty-five still leaves you three decades of compound growth, which is a lot of time.",
     "Automate a fixed monthly contribution and raise it whenever your income goes up."),
    ("reducing food waste at home", "we throw away vegetables almost every week",
     "Plan meals for the week before you shop and buy only what those meals need.",
     "Keep a shelf in the fridge for food that should be eaten first, and cook soup from leftovers."),
    ("teaching a child to ride a bicycle", "my daughter is six and afraid of falling",
     "Remove the pedals at first so she can push along with her feet and learn to balance.",
     "Choose a gentle grassy slope, which makes falls softer and gives her a little speed."),
    ("brewing coffee with a French press", "my coffee tastes bitter and muddy",
     "Use a coarse grind and water just below boiling, then steep for about four minutes.",
     "Pour the coffee out as soon as it is ready, because leaving it on the grounds keeps extracting."),
    ("preparing for a job interview", "the interview is for a data analyst position next Tuesday",
     "Prepare three short stories about problems you solved, each with the situation, your action and "
     "the result.",
     "Read the company's recent reports and think of one question about how the team uses its data."),
]

OPENERS = [
    "Can you explain how to get better at {subject}? {Situation}, and I am not sure what I am doing wrong.",
    "I would like some advice about {subject}. {Situation}. What would you suggest I try first?",
    "Write a short guide to {subject} for a complete beginner, keeping in mind that {situation}.",
]

BACKGROUND = (
    " To give you some background, I have been reading articles and watching videos about {subject} for "
    "several months, but most of them assume that the reader already knows the basics and has plenty of "
    "free time. I work full time, I have a small flat, and I do not want to spend a lot of money on "
    "equipment that I might only use a few times. Friends have given me suggestions, but they often "
    "contradict each other, and I would rather understand the reasons behind each step than follow a list "
    "of rules. I am also curious which mistakes are worth avoiding from the start, so that I do not build "
    "habits that are hard to change later. Please be specific and assume that I am patient."
)

FOLLOW_UPS = [
    "Thanks, that helps. How long should I expect to wait before I notice a difference?",
    "What is the most common mistake people make with {subject}?",
    "Could you summarise that in three short points?",
]

SECOND_ANSWERS = [
    "Most people notice a change within a few weeks if they stay consistent. Keep brief notes on what you "
    "try, because it is easy to forget which change made the difference.",
    "The most common mistake is trying to change everything at once. Change one thing at a time, wait to "
    "see its effect, and only then move on to the next.",
    "First, start small and be consistent. Second, change one thing at a time. Third, write down what "
    "works so that you can repeat it.",
]


def ultrachat_rows(count: int) -> list[dict[str, Any]]:
    """`count` rows in the ultrachat_200k schema; row i depends only on i."""
    rows = []
    for i in range(count):
        subject, situation, advice_a, advice_b = TOPICS[i % len(TOPICS)]
        opener = OPENERS[(i // len(TOPICS)) % len(OPENERS)]
        capitalised = situation[0].upper() + situation[1:]
        prompt = opener.format(subject=subject, situation=situation, Situation=capitalised)
        if i % 4 == 3:  # a long first turn: more than 128 tokens, so scheme T1 truncates it
            prompt += BACKGROUND.format(subject=subject)
        answer = (f"Good question. With {subject}, small adjustments matter more than big ones. "
                  f"{advice_a} {advice_b}")
        messages = [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]
        if i % 5 != 0:
            k = (i // 3) % len(FOLLOW_UPS)
            messages += [{"content": FOLLOW_UPS[k].format(subject=subject), "role": "user"},
                         {"content": SECOND_ANSWERS[k], "role": "assistant"}]
        prompt_id = hashlib.sha256(f"{i}:{prompt}".encode()).hexdigest()
        rows.append({"prompt": prompt, "prompt_id": prompt_id, "messages": messages})
    return rows


def make_ultrachat_parquet(directory: Path, rows: int,
                           name: str = "train_sft-00000-of-00001.parquet") -> Path:
    """A parquet file named like a hub shard; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    pq.write_table(pa.Table.from_pylist(ultrachat_rows(rows)), path)
    return path


def make_ultrachat_jsonl(directory: Path, rows: int, name: str = "train_sft.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(json.dumps(row) + "\n" for row in ultrachat_rows(rows)), encoding="utf-8")
    return path


def make_gpt2_tokenizer_dir(directory: Path) -> Path:
    """A GPT-2-style byte-level BPE of FIXTURE_GPT2_VOCAB tokens, saved with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]  # a lazy alias in transformers 5

    texts = [m["content"] for row in ultrachat_rows(60) for m in row["messages"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=FIXTURE_GPT2_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend)
    assert len(tokenizer) == FIXTURE_GPT2_VOCAB, len(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def make_gpt2_model_dir(directory: Path, vocab_size: int, n_embd: int) -> Path:
    """A one-layer GPT2LMHeadModel saved as model.safetensors (wte under `transformer.wte.weight`)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_head=2, n_embd=n_embd, vocab_size=vocab_size, n_positions=64,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(str(directory))
    return directory


def synthetic_experiment(name: str, samples: str = "[12, 24]", freeze: bool = True, experiment_keys: str = ""
                         ) -> str:
    """The head of a tiny experiment: the seeded synthetic source (400 documents of 20 words, validation
    rows 300-311), the bytes tokenizer, a random table and one CPU thread; tables and models follow.
    `experiment_keys`: more lines of its [experiment] table."""
    return f"""
[experiment]
name = "{name}"
samples = {samples}
seed = 7
{experiment_keys}

[data]
source = "synthetic"
words_per_doc = 20
docs = 400
val = {{ start = 300, count = 12 }}

[tokenizer]
name = "bytes"

[embedding]
source = "random"
freeze = {str(freeze).lower()}

[runner]
name = "cpu"
threads = 1
"""


def synthetic_ids(rows: range, docs: int = 400, words_per_doc: int = 20) -> np.ndarray:
    """The `bytes` ids of these rows of the synthetic source (by default synthetic_experiment's), built
    here from the documents' text as a stream stores them: little-endian int32, documents back to back."""
    from newllm_kit_plugins.data.synthetic import Synthetic, SyntheticSettings

    documents = Synthetic(SyntheticSettings(docs=docs, words_per_doc=words_per_doc)).all_documents()
    return np.frombuffer(b"".join(documents[row][0].encode("utf-8") for row in rows), dtype=np.uint8).astype("<i4")


def ids_sha256(ids: np.ndarray) -> str:
    """What meta.json records for a stream: the sha256 of its ids as written (int32, little-endian)."""
    return hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()
