"""User questions about everyday life for a draft's chat data (`speculant distill --chat-prompts broad`):
the target is asked to write one question about an area of life (a fifth of them in another language),
then answers it (speculant.distill.train builds the corpus from the answers)."""

from __future__ import annotations

import random

from speculant.distill.data import chat_sequences, user_turn

# Everyday questions (`--chat-prompts broad`): the target is asked to write one user question about an
# area of everyday life (a fifth of them in another language), then answers it. The benchmarks' held-out
# chat, math and multilingual prompts (benchmarks/prompts/) are hand-written and never shown to it: the
# categories below name areas of life, not questions. A coder model left to write its own questions
# (`self_written_questions`) asks about programming, so without these its answers to everyday questions,
# word problems and other languages never reach a draft.
EVERYDAY_CATEGORIES = (
    "cooking dinner", "baking bread", "baking cakes", "vegetarian meals", "meal planning", "food storage",
    "kitchen tools", "coffee", "tea", "breakfast ideas", "lunch boxes for school", "spices", "desserts",
    "cleaning the house", "doing laundry", "ironing clothes", "organising a wardrobe", "home repairs",
    "painting a room", "plumbing problems", "heating and saving energy", "moving house", "furniture",
    "gardening", "growing vegetables", "lawn care", "indoor plants", "composting", "pets", "dogs", "cats",
    "aquarium fish", "birds in the garden", "raising children", "toddlers", "teenagers", "school homework",
    "family holidays", "birthday parties", "weddings", "gifts", "etiquette", "friendship", "dating",
    "relationships", "neighbours", "writing a letter", "writing an email to a colleague", "speeches",
    "job interviews", "writing a CV", "asking for a raise", "working from home", "time management",
    "productivity habits", "stress at work", "public speaking", "negotiation", "starting a small business",
    "personal budgeting", "saving money", "saving for retirement", "taxes for individuals", "insurance",
    "buying a house", "renting a flat", "credit cards", "loans and mortgages", "shopping online",
    "sleep", "healthy eating", "vitamins", "running", "cycling", "swimming", "yoga", "strength training",
    "stretching", "walking", "back pain", "headaches", "colds and flu", "first aid", "allergies", "dental care",
    "skin care", "hair care", "mental health", "meditation", "motivation", "habits", "loneliness",
    "travel planning", "packing for a trip", "flying", "train journeys", "road trips", "camping", "hiking",
    "visiting a new city", "travelling with children", "learning a language", "hotels", "museums",
    "cars and driving", "car maintenance", "bicycles", "public transport", "weather", "the seasons",
    "astronomy", "the solar system", "animals", "the ocean", "volcanoes and earthquakes", "climate",
    "the human body", "chemistry in everyday life", "physics in everyday life", "electricity at home",
    "world history", "ancient Rome", "the Middle Ages", "the industrial revolution", "geography",
    "famous explorers", "world capitals", "economics", "politics and government", "philosophy",
    "literature", "poetry", "novels", "films", "music", "learning an instrument", "painting and drawing",
    "photography", "board games", "sports rules", "football", "tennis", "chess", "puzzles and riddles",
    "mental arithmetic", "percentages", "fractions", "unit conversions", "a math word problem about shopping",
    "a math word problem about travel times", "a math word problem about ages", "simple geometry",
    "probability in games", "statistics in the news", "smartphones", "using a computer safely",
    "passwords and online safety", "social media", "email", "printers", "home internet", "streaming services",
    "recycling", "sustainable living", "volunteering", "community events", "religious holidays",
    "festivals around the world", "customs in other countries", "retirement hobbies", "caring for parents",
)
QUESTION_LANGUAGES = ("German", "French", "Spanish", "Italian", "Portuguese", "Dutch", "Polish", "Swedish")
QUESTION_REQUEST = ("Write one question that a person might ask a helpful assistant about {category}. "
                    "Reply with the question only.")
QUESTION_REQUEST_IN = ("Write one question in {language} that a person might ask a helpful assistant about "
                       "{category}. Reply with the question only, in {language}.")


def question_requests(count: int, seed: int = 0, other_languages: float = 0.2) -> list[str]:
    """`count` requests for one user question each: EVERYDAY_CATEGORIES in a shuffled cycle, a share
    `other_languages` of them (every k-th) asking for the question in one of QUESTION_LANGUAGES."""
    rng = random.Random(seed)
    every = round(1 / other_languages) if other_languages > 0 else 0
    requests, cycle = [], []
    for i in range(count):
        if not cycle:
            cycle = list(EVERYDAY_CATEGORIES)
            rng.shuffle(cycle)
        category = cycle.pop()
        if every and i % every == every - 1:
            requests.append(QUESTION_REQUEST_IN.format(language=rng.choice(QUESTION_LANGUAGES), category=category))
        else:
            requests.append(QUESTION_REQUEST.format(category=category))
    return requests


QUOTES = "\"'“”„‚‘’«» "


def question_line(reply: str) -> str:
    r"""The line of a reply that asks: its first line ending in "?", else its first that is no lead-in
    ending in ":" (such as "Here is a question about gardening:"), quotes stripped.

    >>> question_line('Sure! Here is one:\n\n"How do I keep basil alive?"')
    'How do I keep basil alive?'
    >>> question_line("„Wie koche ich Reis?“")
    'Wie koche ich Reis?'
    """
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    line = next((x for x in lines if x.rstrip(QUOTES).endswith("?")), next((x for x in lines if not x.endswith(":")), ""))
    return line.strip(QUOTES).strip()


def requested_questions(model, tokenizer, count: int, *, seed: int = 0, max_new_tokens: int = 64,
                        batch_size: int = 64, progress: bool = True) -> list[str]:
    """Up to `count` user questions written by `model` when asked for one (`question_requests`), sampled
    at temperature 1: each reply's first line that ends in "?" (else its first line that is no lead-in ending in
    ":"), quotes stripped; unfinished or near-empty replies dropped."""
    _, stop = user_turn(tokenizer)
    prompts = [list(tokenizer.encode_chat([{"role": "user", "content": request}], add_generation_prompt=True))
               for request in question_requests(count, seed)]
    written = chat_sequences(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=stop,
                             seed=seed, batch_size=batch_size, progress=progress)
    questions = []
    for prompt, ids in zip(prompts, written):
        reply = ids[len(prompt):]
        if not reply or reply[-1] not in stop:
            continue
        text = question_line(tokenizer.decode(reply, skip_special_tokens=True))
        if len(text.split()) >= 3:
            questions.append(text)
    return questions
