"""Counters, gauges and histograms for ``ia3 serve``'s ``/metrics``, in the Prometheus text exposition format.

The format is plain text (``# HELP``, ``# TYPE``, ``name{label="v"} value``, histograms as cumulative ``_bucket``
lines plus ``_sum`` and ``_count``), so no client library is needed. Thread-safe: the model thread and the event
loop both record.
"""

from __future__ import annotations

import threading

# name -> (type, help, histogram buckets)
METRICS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "ia3_requests_total": ("counter", "HTTP requests answered, by endpoint and status code.", ()),
    "ia3_request_duration_seconds": (
        "histogram",
        "Time from request to last byte, by endpoint.",
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    ),
    "ia3_batch_rows": ("histogram", "Rows per model batch.", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "ia3_batch_adapters": ("histogram", "Distinct adapters per model batch.", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "ia3_tokens_generated_total": ("counter", "Completion tokens generated.", ()),
    "ia3_batches_failed_total": ("counter", "Model batches that raised (their requests got HTTP 500), by kind.", ()),
    "ia3_rows_cancelled_total": ("counter", "Rows dropped mid-generation (client gone or stop string).", ()),
    "ia3_active_rows": ("gauge", "Rows of the generation batch now running.", ()),
    "ia3_queue_rows": ("gauge", "Rows waiting for a batch.", ()),
    "ia3_adapters_loaded": ("gauge", "Adapters loaded in memory.", ()),
    "ia3_adapter_loads_total": ("counter", "Adapter loads (first use, reload after eviction, POST /adapters).", ()),
    "ia3_adapter_evictions_total": ("counter", "Adapters evicted by the LRU bound (--max-adapters).", ()),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """The server's metrics; names and types come from :data:`METRICS`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], float] = {}
        self._hists: dict[tuple[str, Labels], list[float]] = {}  # bucket counts..., sum, count

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + by

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = value

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = METRICS[name][2]
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self._hists.setdefault(key, [0.0] * (len(buckets) + 2))
            for i, bound in enumerate(buckets):
                if value <= bound:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def snapshot(self) -> tuple[dict, dict]:
        """Every value and histogram now, as plain picklable dicts (for :meth:`absorb` in another process)."""
        with self._lock:
            return dict(self._values), {k: list(v) for k, v in self._hists.items()}

    def absorb(self, snapshot: tuple[dict, dict], **labels: str) -> None:
        """Add another process's :meth:`snapshot` under extra labels (one ``replica`` label per Ray replica)."""
        extra = tuple(labels.items())
        values, hists = snapshot
        with self._lock:
            for (name, own), value in values.items():
                self._values[(name, tuple(sorted(own + extra)))] = value
            for (name, own), h in hists.items():
                self._hists[(name, tuple(sorted(own + extra)))] = list(h)

    def render(self) -> str:
        """The exposition text: every declared metric, zero when never recorded."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_, buckets) in METRICS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    series = {k: v for k, v in self._hists.items() if k[0] == name} or {
                        (name, ()): [0.0] * (len(buckets) + 2)
                    }
                    for (_, labels), h in sorted(series.items()):
                        for bound, count in zip([*buckets, "+Inf"], [*h[: len(buckets)], h[-1]], strict=True):
                            lines.append(f"{name}_bucket{_fmt(labels + (('le', _num(bound)),))} {_num(count)}")
                        lines.append(f"{name}_sum{_fmt(labels)} {_num(h[-2])}")
                        lines.append(f"{name}_count{_fmt(labels)} {_num(h[-1])}")
                else:
                    series = {k: v for k, v in self._values.items() if k[0] == name} or {(name, ()): 0}
                    for (_, labels), value in sorted(series.items()):
                        lines.append(f"{name}{_fmt(labels)} {_num(value)}")
        return "\n".join(lines) + "\n"


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, escaped, strict=True)) + "}"


def _num(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else repr(float(value))
