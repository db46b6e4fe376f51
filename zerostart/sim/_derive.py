"""Many sporadic models from one busy service, reproducibly.

The published traces are one service each, busy for an hour. Scale-to-zero is about many
models with sporadic traffic, so a workload is derived from them in four seeded steps, each
recorded in ``Trace.derivation`` and printed with every report:

  repeat K    the trace K times back to back (a longer run with the same texture)
  thin F      keep each request with probability F
  models N    give each request to one of N models drawn from a popularity law
              (``zipf:S``: model k has weight 1/k^S; ``uniform`` = zipf:0); model m000 is
              the most popular. Each model's arrivals are thereby a random thinning of the
              service's, with its bursts and lulls.
  stretch X   multiply every timestamp by X (an hour becomes X hours; rates fall by X)
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
           thin: float = 1.0, repeat: int = 1, seed: int = 0) -> Trace:
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
    exponent = parse_popularity(popularity)
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

    return Trace(times=times, models=mids, model_names=list(names), input_tokens=tin, output_tokens=tout,
                 source=trace.source, format=trace.format, derivation=steps)
