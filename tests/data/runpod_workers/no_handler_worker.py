"""A file that is not a worker: no start call and no function named handler."""


def process(job):
    return job["input"]
