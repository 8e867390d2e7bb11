"""Base instructions for the instruction-following task: form × topic × audience, split by a hash of the text."""

from __future__ import annotations

from itermerge.tasks.arithmetic import SPLITS, hash_split

__all__ = ["AUDIENCES", "FORMS", "SPLITS", "TOPICS", "base_instructions", "split_of"]

FORMS = (
    "Write a short story about {topic} for {audience}.",
    "Write a poem about {topic} for {audience}.",
    "Explain {topic} to {audience}.",
    "Write an email to {audience} about {topic}.",
    "Write a blog post about {topic} for {audience}.",
    "Give {audience} some practical advice about {topic}.",
    "Describe {topic} to {audience}.",
    "Write a letter to {audience} about {topic}.",
    "Write a short speech about {topic} for {audience}.",
    "List the main facts about {topic} that {audience} should know.",
    "Write a product description related to {topic} for {audience}.",
    "Write a diary entry about {topic} that {audience} would enjoy reading.",
)
TOPICS = (
    "the ocean", "volcanoes", "honey bees", "the moon landing", "recycling", "a rainy day", "learning to swim",
    "the history of bread", "solar power", "a city park", "winter holidays", "the human heart", "trains",
    "chess", "a lost cat", "the first day of school", "gardening", "the Roman Empire", "coffee", "friendship",
    "a mountain hike", "electric cars", "the water cycle", "dinosaurs", "a birthday party", "the internet",
    "saving money", "the night sky", "a small bakery", "football", "rainforests", "healthy breakfasts",
    "a road trip", "libraries", "penguins", "the invention of the telephone", "a music festival", "kindness",
    "bicycles", "a thunderstorm",
)
AUDIENCES = (
    "a five-year-old", "a group of teenagers", "a busy parent", "a retired teacher", "a new employee",
    "a curious scientist", "a tourist", "a grandmother", "a college student", "a small business owner",
    "a sports fan", "a classroom of children",
)


def split_of(text: str) -> str:
    """The split a base instruction belongs to, by a hash of its text (the arithmetic task's 80/10/10 rule)."""
    return hash_split("base:" + text)


def base_instructions(split: str) -> list[str]:
    """Every base instruction of ``split``, in a fixed order (12 forms × 40 topics × 12 audiences = 5,760 in all)."""
    every = [f.format(topic=t, audience=a) for f in FORMS for t in TOPICS for a in AUDIENCES]
    return [text for text in every if split_of(text) == split]
