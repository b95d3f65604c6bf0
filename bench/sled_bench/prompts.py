"""Prompts shared by the losslessness test and the benchmarks: varied tasks (facts,
code, arithmetic, translation, lists, prose) so acceptance is not one kind of text."""

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain photosynthesis to a ten-year-old.",
    "List five fruits that are red.",
    "Translate 'good morning, my friend' into Spanish and German.",
    "Write a haiku about the sea at night.",
    "What is 17 times 23? Show your steps.",
    "Give three tips for staying focused while studying.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Write a short SQL query that counts rows in a table named users.",
]
