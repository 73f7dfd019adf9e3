"""A two-step DSPy question answerer: classify the topic, then answer."""
