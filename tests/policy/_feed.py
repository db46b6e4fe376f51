"""Feeding hand-built arrival sequences to a policy."""


def feed(p, gaps, model="m", service=1.0, start=0.0):
    """Requests separated by the given idle times; returns the last completion time."""
    t = start
    for gap in [None, *gaps]:
        if gap is not None:
            t += gap
        p.observe_arrival(model, t)
        t += service
        p.observe_completion(model, t)
    return t
