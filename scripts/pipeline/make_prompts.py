#!/usr/bin/env python3
"""Write the default prompt set of the SmolLM2 sentiment pipeline.

Usage: make_prompts.py [-n COUNT] [--seed SEED] [-o FILE]
       (default: 300 prompts, seed 2406, pipelines/data/sentiment-prompts.jsonl)

Fills templates such as "Describe your last trip to {place}." with words from
fixed lists, deterministically (Python's `random.Random(SEED)`, no other
input), and writes one prompts-shard row per line:

    {"prompt_id": "p0001", "messages": [{"role": "user", "content": "..."}], "topic": "travel"}

The prompts ask for experiences, opinions and descriptions, with no sentiment
asked for, so that a sentiment reward (the VADER lexicon) has room to rise as
the policy is tuned. Rerunning the script gives the same file byte for byte.
"""

import argparse
import json
import random
import sys

PLACES = [
    "Lisbon", "Kyoto", "the Scottish Highlands", "Marrakesh", "Iceland", "New York", "a small fishing village",
    "the Alps", "Buenos Aires", "Cape Town", "a seaside town", "your grandparents' town", "Vienna", "Hanoi",
    "the desert", "a national park", "Istanbul", "a mountain cabin", "Copenhagen", "the countryside",
]
FILMS = [
    "Casablanca", "The Matrix", "Spirited Away", "Jaws", "Inception", "The Godfather", "Toy Story",
    "Amélie", "Mad Max: Fury Road", "Paddington 2", "Alien", "Up", "Titanic", "Parasite", "Rocky",
]
BOOKS = [
    "Pride and Prejudice", "Moby-Dick", "The Hobbit", "1984", "Dune", "Little Women", "Frankenstein",
    "The Old Man and the Sea", "Jane Eyre", "Don Quixote", "The Little Prince", "Dracula",
]
THINGS = [
    "learning to cook", "working from home", "a new phone", "public transport", "gardening", "running a marathon",
    "learning a new language", "a noisy neighbour", "online shopping", "a rainy holiday", "moving house",
    "a job interview", "camping", "a power cut", "your first car", "a group project", "a long flight",
    "adopting a pet", "a dentist appointment", "night shifts", "a cooking class", "a broken laptop",
]
FOODS = [
    "pizza", "sushi", "a vegetable soup", "pancakes", "a curry", "fresh bread", "an apple pie", "tacos",
    "a salad", "dumplings", "porridge", "a chocolate cake", "fish and chips", "ramen",
]
PLACES_LOCAL = [
    "café", "library", "park", "gym", "museum", "train station", "bakery", "market", "hotel", "restaurant",
    "bookshop", "swimming pool", "cinema", "hospital waiting room", "airport",
]
EVENTS = [
    "a wedding", "a birthday party", "a concert", "a football match", "a school reunion", "a job fair",
    "a family dinner", "a street festival", "a thunderstorm", "the first day at a new job", "a long queue",
    "a camping trip", "a road trip", "a chess tournament", "a snow day",
]
PEOPLE = [
    "a teacher", "a neighbour", "a colleague", "a bus driver", "a shopkeeper", "an old friend", "a nurse",
    "a stranger on a train", "a coach", "a landlord",
]
SEASONS = ["spring", "summer", "autumn", "winter", "a Monday morning", "a Sunday afternoon", "a holiday"]
PRODUCTS = [
    "a pair of headphones", "a coffee machine", "a bicycle", "a backpack", "an electric kettle", "a tent",
    "a desk chair", "a pair of running shoes", "a smartwatch", "a blender", "a winter coat", "an umbrella",
]
JOBS = [
    "a baker", "a firefighter", "a librarian", "a software developer", "a farmer", "a pilot", "a chef",
    "a nurse", "a postal worker", "a teacher", "a carpenter", "a musician",
]

# (topic, template, slot lists); each {} is filled from the matching list.
TEMPLATES = [
    ("travel", "Describe your last trip to {}.", [PLACES]),
    ("travel", "What was it like to spend a week in {}?", [PLACES]),
    ("travel", "Write a short postcard home from {}.", [PLACES]),
    ("film", "Review the film {}.", [FILMS]),
    ("film", "What did you think of the ending of {}?", [FILMS]),
    ("books", "Give your opinion of the book {}.", [BOOKS]),
    ("books", "Describe the main character of {} in a few sentences.", [BOOKS]),
    ("experience", "Tell me about your experience with {}.", [THINGS]),
    ("experience", "How did {} change your week?", [THINGS]),
    ("food", "Describe the taste of {} you had recently.", [FOODS]),
    ("food", "Write a short restaurant review of a place that serves {}.", [FOODS]),
    ("places", "Describe the {} in your neighbourhood.", [PLACES_LOCAL]),
    ("places", "What is a typical afternoon like at the local {}?", [PLACES_LOCAL]),
    ("events", "Tell me about {} you remember well.", [EVENTS]),
    ("events", "Write a diary entry about {}.", [EVENTS]),
    ("people", "Describe a conversation you had with {}.", [PEOPLE]),
    ("people", "Write a short note to {} you met last week.", [PEOPLE]),
    ("seasons", "How do you usually spend {}?", [SEASONS]),
    ("products", "Write a customer review of {}.", [PRODUCTS]),
    ("products", "Describe the first week of using {}.", [PRODUCTS]),
    ("work", "Describe a day in the life of {}.", [JOBS]),
    ("work", "What would it be like to work as {} for a month?", [JOBS]),
    ("mixed", "Tell me about {} in {}.", [EVENTS, PLACES]),
    ("mixed", "Describe eating {} at the {}.", [FOODS, PLACES_LOCAL]),
]


def prompts(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # One pass over the templates in turn keeps the topics balanced; the texts within a
    # template are shuffled, so the set is varied without being sorted by word list.
    pools = []
    for topic, template, slots in TEMPLATES:
        fillings = [[]]
        for words in slots:
            fillings = [f + [w] for f in fillings for w in words]
        texts = [template.format(*f) for f in fillings]
        rng.shuffle(texts)
        pools.append((topic, texts))
    if count > sum(len(t) for _, t in pools):
        raise SystemExit(f"only {sum(len(t) for _, t in pools)} distinct prompts available")
    chosen = []
    position = 0
    while len(chosen) < count:
        for topic, texts in pools:
            if position < len(texts) and len(chosen) < count:
                chosen.append((topic, texts[position]))
        position += 1
    rng.shuffle(chosen)
    return [
        {
            "prompt_id": f"p{i + 1:04d}",
            "messages": [{"role": "user", "content": text}],
            "topic": topic,
        }
        for i, (topic, text) in enumerate(chosen)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2406)
    parser.add_argument("-o", "--output", default="pipelines/data/sentiment-prompts.jsonl")
    args = parser.parse_args()
    rows = prompts(args.count, args.seed)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8", newline="\n")
    with out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
