"""`up`: create the slice, start training on every host, and watch it to the end.

Preemption (queued resource SUSPENDING/SUSPENDED/FAILED/gone, or hosts unreachable past
--host-timeout) -> delete, recreate and resume, at most --retries times with exponential
backoff. Crash (slice ACTIVE, a host's training exited non-zero) -> stop every host at once,
no recreate, exit 1 with that host's log tail. The slice is deleted at the end unless --keep.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

from launch import worker
from launch.gcloud import Gcloud
from launch.slices import Slice

LOST = {"SUSPENDING", "SUSPENDED", "FAILED", "GONE", "DELETING"}  # the slice is going away
WAITING = {"CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES", "UNKNOWN"}


class PodError(RuntimeError):
    """The job cannot go on: FAILED or timed out while waiting, crashed, out of retries."""


class Pod:
    def __init__(self, a, sl: Slice, g: Gcloud, sleep=time.sleep, clock=time.monotonic):
        self.a, self.sl, self.g, self.sleep, self.clock = a, sl, g, sleep, clock
        self.hosts = worker.host_names(g.nodes(), sl.hosts)

    def say(self, msg: str) -> None:
        print(f"[launch] {msg}", file=sys.stderr, flush=True)

    # --- slice ---------------------------------------------------------------------------

    def wait_active(self) -> str:
        """Poll the queued resource until ACTIVE; FAILED or the timeout raise, lost returns."""
        t0, last, unreachable = self.clock(), None, None
        while True:
            state = self.g.state()
            if state != last:
                self.say(f"queued resource {self.a.name}: {state}")
                last = state
            if state == "ACTIVE":
                return state
            if state == "FAILED":
                raise PodError(
                    f"queued resource {self.a.name} FAILED while waiting for capacity (see "
                    f"`gcloud compute tpus queued-resources describe {self.a.name}`); it is "
                    "left for inspection: delete it with `launch/tpu.py delete`"
                )
            if state in LOST - {"FAILED"}:
                return state
            unreachable = unreachable or self.clock() if state == "UNREACHABLE" else None
            if unreachable and self.clock() - unreachable > self.a.host_timeout:
                raise PodError(f"gcloud keeps failing: {self.g.last_error}")
            if self.clock() - t0 > self.a.wait_timeout:
                raise PodError(
                    f"queued resource {self.a.name} not ACTIVE after {self.a.wait_timeout:.0f} s "
                    f"(state {state}); delete it with `launch/tpu.py delete` or raise "
                    "--wait-timeout"
                )
            self.sleep(self.a.poll)

    def on_every_node(self, command: str, what: str) -> None:
        for node in self.g.nodes():
            r = self.g.ssh(node, "all", command)
            if r.code:
                raise PodError(f"{what} failed on {node} (exit {r.code}):\n{r.text[-3000:]}")

    def start(self) -> None:
        """Cleanup on every worker, then training detached on every worker."""
        self.on_every_node(worker.stop_command(), "cleanup")
        with ThreadPoolExecutor(min(16, len(self.hosts))) as pool:
            results = pool.map(
                lambda h: (h, self.g.ssh(h[0], str(h[1]), worker.start_command(self.a, h[2]))),
                self.hosts,
            )
            for (node, w, _), r in results:
                if r.code:
                    raise PodError(f"could not start worker {w} of {node}: {r.text[-2000:]}")

    # --- hosts ---------------------------------------------------------------------------

    def statuses(self) -> dict[str, str] | None:
        """{host: status} from every node, or None when no node answered."""
        found: dict[str, str] = {}
        answered = False
        for node in self.g.nodes():
            r = self.g.ssh(node, "all", worker.status_command(), quiet=True)
            answered |= bool(worker.parse_status(r.out))
            found.update(worker.parse_status(r.out))
        return found if answered else None

    def watch(self) -> tuple[str, str | None]:
        """('done'|'crashed'|'lost', host) once training ended or the slice went away."""
        unreachable_since = None
        while True:
            self.sleep(self.a.poll)
            state = self.g.state()
            if state in LOST:
                self.say(f"queued resource {self.a.name}: {state} (preempted)")
                return "lost", None
            st = self.statuses() if state == "ACTIVE" else None
            if st is None:  # gcloud or ssh did not answer: retry until --host-timeout
                unreachable_since = unreachable_since or self.clock()
                if self.clock() - unreachable_since > self.a.host_timeout:
                    self.say(f"hosts unreachable for {self.a.host_timeout:.0f} s: treating as lost")
                    return "lost", None
                continue
            unreachable_since = None
            for _, _, host in self.hosts:
                s = st.get(host, "")
                if s.startswith("exit ") and s != "exit 0":
                    return "crashed", host
            if all(st.get(h) == "exit 0" for _, _, h in self.hosts):
                return "done", None
            if any(st.get(h) == "none" for _, _, h in self.hosts):
                self.say("a host's training vanished (VM restarted?): treating as lost")
                return "lost", None

    def fail_fast(self, host: str) -> str:
        """Stop every host at once; the crashed host's log tail."""
        node, w = next((n, w) for n, w, h in self.hosts if h == host)
        for n in self.g.nodes():
            self.g.ssh(n, "all", worker.stop_command(grace_s=10))
        return self.g.ssh(node, str(w), worker.tail_command(), quiet=True).text

    # --- the loop ------------------------------------------------------------------------

    def attached(self) -> bool:
        """True when training from an earlier `up` is still running (the launcher had gone)."""
        st = self.statuses()
        return bool(st) and any(v == "running" for v in st.values())

    def up(self) -> int:
        attempt = 0
        while True:
            state = self.g.state()
            if state == "ACTIVE" and attempt == 0 and self.attached():
                self.say("training is already running on the slice: watching it")
            else:
                if state in LOST:
                    if state != "GONE":
                        self.g.delete()
                    r = self.g.create(self.sl)
                    if r.code and "ALREADY_EXISTS" not in r.text:
                        raise PodError(f"could not create {self.a.name}:\n{r.text[-3000:]}")
                elif state in WAITING | {"UNREACHABLE"}:
                    pass  # created earlier, still coming up
                state = self.wait_active()
                if state != "ACTIVE":
                    attempt = self.retry(attempt, f"lost while coming up ({state})")
                    continue
                self.on_every_node(worker.setup_command(self.a), "setup")
                self.start()
                self.say(
                    f"training started on {len(self.hosts)} hosts; logs in {self.a.run_dir}/logs/"
                )
            outcome, host = self.watch()
            if outcome == "done":
                self.say("training finished")
                self.finish()
                return 0
            if outcome == "crashed":
                tail = self.fail_fast(host)
                self.say(f"host {host} crashed; stopped every host (no recreate). Its log:")
                print(tail, file=sys.stderr)
                self.finish()
                return 1
            attempt = self.retry(attempt, "preempted")

    def retry(self, attempt: int, why: str) -> int:
        attempt += 1
        if attempt > self.a.retries:
            raise PodError(
                f"{why}, and out of retries ({self.a.retries}); the run resumes "
                "from its last checkpoint when launched again"
            )
        wait = min(self.a.retry_wait * 2 ** (attempt - 1), 3600)
        self.say(
            f"{why}: delete, recreate and resume (retry {attempt}/{self.a.retries}) in {wait:.0f} s"
        )
        self.g.delete()
        self.sleep(wait)
        return attempt

    def finish(self) -> None:
        if self.a.keep:
            self.say(f"--keep: slice {self.a.name} left running")
        else:
            self.g.delete()


def plan(a, sl: Slice, g: Gcloud) -> int:
    """--dry-run of `up`: the commands of one attempt, in order."""
    g.create(sl)
    g.out(f"# poll until ACTIVE: {' '.join(g.base('queued-resources', 'describe', a.name))}")
    for node in g.nodes():
        g.ssh(node, "all", worker.setup_command(a))
    for node in g.nodes():
        g.ssh(node, "all", worker.stop_command())
    for node, w, host in worker.host_names(g.nodes(), sl.hosts):
        g.ssh(node, str(w), worker.start_command(a, host))
    g.out(f"# poll every {a.poll:.0f} s: queued-resource state and, on every node:")
    g.out(f"#   {worker.status_command()}")
    if not a.keep:
        g.delete()
    return 0
