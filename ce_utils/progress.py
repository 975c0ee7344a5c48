"""The one progress printer of the scripts (decoding, generating the embedded data, evaluating,
downloading, probing): a rate-limited line on stderr, silent for short jobs.

    python -c "from ce_utils import progress; p = progress.Progress(2, 'demo'); p(1); p(2)"
"""
import sys
import time

# The ETA shows once 1/ETA_AFTER of the work is done: the first items' rate includes the start-up
# (a decoding pool's workers importing torch) and would predict hours for minutes of work.
ETA_AFTER = 50


def _num(x):
    """A count or rate for display: whole numbers from 10 up, one decimal below."""
    return f"{x:,}" if isinstance(x, int) else f"{x:,.0f}" if abs(x) >= 10 else f"{x:.1f}"


class Progress:
    """`desc: done/total unit (rate, ETA)` on stderr, at most every `every` s and once at the end.

    Silent when total <= `above` (a short job), unless `after` is given: such a job shows its first
    report once it has run `after` seconds (a slow one), the next ones every `every` s. A
    terminal gets one line redrawn in place, a log file one line per report. `scale` divides the
    counts shown (1e6: bytes as MB); `start` units were done before (a resumed download): counted
    in done, not in the rate. total None: no ETA; none either until 1/ETA_AFTER of the total is
    done.
    """

    def __init__(self, total, desc, unit="images", rate_unit="img/s", every=0.5, above=0, scale=1,
                 start=0, after=None):
        self.total, self.desc, self.unit, self.rate_unit = total, desc, unit, rate_unit
        self.every, self.scale, self.start, self.after = every, scale, start, after
        self.on = total is None or total > above
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        self.ended = self.shown = False

    def __call__(self, done, extra="", final=False):
        """Report `done` units; the last report (done >= total, or final=True) ends the line."""
        final = final or (self.total is not None and done >= self.total)
        now = time.perf_counter()
        slow = not self.on and self.after is not None and now - self.t0 >= self.after
        due = final or now - self.last >= self.every or (slow and not self.shown)
        if not (self.on or slow) or self.ended or not due:
            return
        self.last, self.ended, self.shown = now, final, True
        elapsed = max(now - self.t0, 1e-9)
        rate = (done - self.start) / elapsed
        shown = (lambda k: k) if self.scale == 1 else (lambda k: k / self.scale)
        count = _num(shown(done)) + (f"/{_num(shown(self.total))}" if self.total else "")
        if final:
            when = f", {_num(elapsed)}s"
        elif self.total and done - self.start >= self.total / ETA_AFTER:
            when = f", ETA {(self.total - done) / max(rate, 1e-9):.0f}s"
        else:
            when = ""
        speed = f"{_num(rate / self.scale)} {self.rate_unit}"
        line = f"{self.desc}: {count} {self.unit} ({speed}{when}){extra}"
        if self.tty:   # redrawn in place; the spaces wipe the end of a longer earlier line
            print(f"\r{line}   ", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
