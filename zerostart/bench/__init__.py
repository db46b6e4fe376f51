"""The benchmarks behind ``zerostart bench load|generate|serve`` and ``zerostart coldstart``
(each a command module here), and what the scripts in the repository's ``bench/`` share with
them. The top floor of the house: nothing in zerostart imports it."""

from zerostart.bench._ceilings import pinned_h2d

__all__ = ["pinned_h2d"]
