"""Many sporadic models from one busy service, reproducibly.

The published traces are one service each, busy for an hour. Scale-to-zero is about many
models with sporadic traffic, so a workload is derived from them in these seeded steps, each
recorded in ``Trace.derivation`` and printed with every report:

  window      the requests from ``start`` seconds into the trace, for ``duration`` seconds of
              the derived workload (``duration`` / stretch seconds of the trace)
  repeat K    the trace K times back to back (a longer run with the same texture)
  thin F      keep each request with probability F
  models N    give each request to one of N models drawn from a popularity law
              (``zipf:S``: model k has weight 1/k^S; ``uniform`` = zipf:0); model m000 is
              the most popular. Each model's arrivals are thereby a random thinning of the
              service's, with its bursts and lulls.
  stretch X   multiply every timestamp by X (an hour becomes X hours; rates fall by X);
              a live replay compresses time instead: ``speed`` X is stretch 1/X
  bound       token counts capped at ``max_input_tokens`` / ``max_output_tokens`` (what a
              live replay sends; the simulator's service times follow them)
"""

from __future__ import annotations

import numpy as np

from zerostart.sim._traces import Trace, TraceError


def parse_popularity(text: str) -> float:
    """``zipf:S`` -> S, ``uniform`` -> 0."""
    t = text.strip().lower()
    if t == "uniform":
        return 0.0
    name, _, arg = t.partition(":")
    if name == "zipf":
        try:
            s = float(arg)
        except ValueError:
            raise TraceError(f"bad popularity {text!r}: zipf needs an exponent, e.g. zipf:1.0") from None
        if not 0 <= s <= 10:
            raise TraceError(f"bad popularity {text!r}: the zipf exponent must be in [0, 10]")
        return s
    raise TraceError(f"unknown popularity law {text!r}; valid: zipf:S (e.g. zipf:1.0), uniform")


def derive(trace: Trace, *, models: int | None = None, popularity: str = "zipf:1.0", stretch: float = 1.0,
           thin: float = 1.0, repeat: int = 1, seed: int = 0, start: float = 0.0, duration: float | None = None,
           max_input_tokens: int | None = None, max_output_tokens: int | None = None) -> Trace:
    """A new trace derived from ``trace`` by the steps in this module's docstring."""
    if repeat < 1:
        raise TraceError(f"--repeat must be at least 1, got {repeat}")
    if not 0 < thin <= 1:
        raise TraceError(f"--thin must be in (0, 1], got {thin}")
    if not stretch > 0:
        raise TraceError(f"--stretch must be positive, got {stretch}")
    if models is not None and models < 1:
        raise TraceError(f"--models must be at least 1, got {models}")
    if models is not None and not trace.single_service:
        raise TraceError(f"{trace.source} already names {len(trace.model_names)} models; "
                         "--models and --popularity apply to single-service traces")
    if not start >= 0 or (duration is not None and not duration > 0):
        raise TraceError(f"--start must be >= 0 and --duration positive, got {start} and {duration}")
    for name, bound in (("--max-prompt-tokens", max_input_tokens), ("--max-output-tokens", max_output_tokens)):
        if bound is not None and bound < 1:
            raise TraceError(f"{name} must be at least 1, got {bound}")
    exponent = parse_popularity(popularity)
    if start > 0 or duration is not None:
        trace = _window(trace, start, None if duration is None else duration / stretch)
    times, mids = trace.times, trace.models
    tin, tout = trace.input_tokens, trace.output_tokens
    steps = list(trace.derivation)

    if repeat > 1:
        n = len(times)
        # Each copy starts one mean gap after the previous one ends.
        period = trace.duration_s + (trace.duration_s / max(n - 1, 1))
        offsets = np.repeat(np.arange(repeat, dtype=np.float64) * period, n)
        times = np.tile(times, repeat) + offsets
        mids = np.tile(mids, repeat)
        tin = None if tin is None else np.tile(tin, repeat)
        tout = None if tout is None else np.tile(tout, repeat)
        steps.append(f"repeated {repeat}x back to back (period {period:.0f} s)")

    if thin < 1:
        keep = np.random.default_rng([seed, 1]).random(len(times)) < thin
        times, mids = times[keep], mids[keep]
        tin = None if tin is None else tin[keep]
        tout = None if tout is None else tout[keep]
        steps.append(f"thinned to {thin:g} (kept {int(keep.sum()):,} requests, seed {seed})")
        if len(times) == 0:
            raise TraceError(f"--thin {thin} left no requests")

    names = trace.model_names
    if models is not None:
        weights = 1.0 / np.arange(1, models + 1, dtype=np.float64) ** exponent
        weights /= weights.sum()
        mids = np.random.default_rng([seed, 2]).choice(models, size=len(times), p=weights).astype(np.int32)
        width = max(3, len(str(models - 1)))
        names = [f"m{i:0{width}d}" for i in range(models)]
        counts = np.bincount(mids, minlength=models)
        law = "uniform" if exponent == 0 else f"zipf(s={exponent:g})"
        steps.append(f"split across {models} models by {law}, seed {seed}: busiest {counts.max():,} requests "
                     f"({counts.max() / len(mids):.1%}), quietest {counts.min():,} ({counts.min() / len(mids):.2%})")

    if stretch != 1:
        times = times * stretch
        steps.append(f"time stretched {stretch:g}x ({trace.duration_s * repeat / 3600:.2f} h -> "
                     f"{(times[-1] - times[0]) / 3600:.2f} h)")

    for name, tokens, bound in (("prompt", tin, max_input_tokens), ("output", tout, max_output_tokens)):
        if bound is not None and tokens is not None:
            capped = int((tokens > bound).sum())
            steps.append(f"{name} tokens capped at {bound} ({capped:,} of {len(tokens):,} requests had more)")
    if tin is not None and max_input_tokens is not None:
        tin = np.minimum(tin, max_input_tokens)
    if tout is not None and max_output_tokens is not None:
        tout = np.minimum(tout, max_output_tokens)

    return Trace(times=times, models=mids, model_names=list(names), input_tokens=tin, output_tokens=tout,
                 source=trace.source, format=trace.format, derivation=steps)


def _window(trace: Trace, start: float, span: float | None) -> Trace:
    """The requests in ``[start, start + span)`` seconds of ``trace``, their times from 0."""
    t = trace.times
    lo = int(np.searchsorted(t, t[0] + start, side="left"))
    hi = len(t) if span is None else int(np.searchsorted(t, t[0] + start + span, side="left"))
    if hi <= lo:
        raise TraceError(f"{trace.source}: no requests between {start:g} s and "
                         f"{'the end' if span is None else f'{start + span:g} s'} of the trace "
                         f"(it lasts {trace.duration_s:.0f} s)")
    keep = slice(lo, hi)
    end = "the end" if span is None else f"{start + span:g} s"
    return Trace(times=t[keep] - (t[0] + start), models=trace.models[keep], model_names=trace.model_names,
                 input_tokens=None if trace.input_tokens is None else trace.input_tokens[keep],
                 output_tokens=None if trace.output_tokens is None else trace.output_tokens[keep],
                 source=trace.source, format=trace.format,
                 derivation=[*trace.derivation, f"window {start:g} s to {end} of the trace ({hi - lo:,} requests)"])
