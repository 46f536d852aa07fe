"""A helper module next to the worker file."""


def shout(text):
    return text.upper() + "!"
