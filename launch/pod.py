"""`up`: create the slice, start training on every host, and watch it to the end.

Preemption (queued resource SUSPENDING/SUSPENDED/FAILED/gone, or a host unreachable past
--host-timeout) -> delete, wait until the delete has finished (DELETING -> gone), recreate
and resume, at most --retries times with exponential backoff. A failed ssh (setup, start) is
read from the queued resource's state: lost -> as a preemption; still ACTIVE -> a setup
failure that names the host(s) whose command failed. With --upload, the `git archive` of
--commit is copied to every worker (scp) of every (re)created slice before its setup; a failed
scp is read as a failed ssh is. A host exiting with a
modxla.errors.RESTART code, or whose training vanished with the slice still ACTIVE (its VM
restarted) -> restart training in place; it resumes. Crash (any other non-zero exit, the
slice still ACTIVE after --crash-grace) -> stop every host at once, no recreate, exit 1 with
that host's log tail. The slice is deleted at the end and on every error or Ctrl-C unless
--keep; only when the launcher's own gcloud cannot reach the API is it left running.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from launch import worker
from launch.gcloud import Gcloud
from launch.slices import Slice
from modxla.errors import RESTART

SETUP_SSH_TIMEOUT_S = worker.SETUP_TIMEOUT_S + 60  # the setup's own timeout ends it first
LOST = {"SUSPENDING", "SUSPENDED", "PREEMPTED", "FAILED", "GONE", "DELETING"}  # going away
WAITING = {"CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES", "UNKNOWN"}
DELETE_TIMEOUT_S = 1800  # for a deleted queued resource to be gone (at most --wait-timeout)
# gcloud's report of one worker of --worker=all (older releases: "with return code N")
WORKER_FAILED = re.compile(r"worker (\d+) failed with (?:exit status|return code) (-?\d+)")


class PodError(RuntimeError):
    """The job cannot go on: FAILED or timed out while waiting, crashed, out of retries."""


class GcloudDown(PodError):
    """The launcher's own gcloud keeps failing: the slice's state is unknown, so it is left."""


class SliceLost(Exception):
    """An ssh failed because the slice is going away (preempted): recreate, not an error."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


class Pod:
    def __init__(
        self, a, sl: Slice, g: Gcloud, sleep=time.sleep, clock=time.monotonic, archive=None
    ):
        self.a, self.sl, self.g, self.sleep, self.clock = a, sl, g, sleep, clock
        self.archive = archive  # --upload: the local `git archive` of --commit
        self.hosts = worker.host_names(g.nodes(), sl.hosts)
        self.down_since = None  # when this machine's gcloud began to fail

    def say(self, msg: str) -> None:
        print(f"[launch] {msg}", file=sys.stderr, flush=True)

    # --- slice ---------------------------------------------------------------------------

    def recreate(self, state: str) -> None:
        """Delete what is left of the slice, wait until it is gone, then create it. A create
        answering ALREADY_EXISTS is success only if the queued resource is not going away
        (an earlier create of ours went through); while a delete is in flight, wait again."""
        for _ in range(3):
            if state != "GONE":
                if state != "DELETING":
                    self.g.delete()
                self.wait_gone()
            r = self.g.create(self.sl)
            if not r.code:
                return
            if "ALREADY_EXISTS" not in r.text:
                raise PodError(f"could not create {self.a.name}:\n{r.text[-3000:]}")
            state = self.state()
            if state not in LOST:
                return  # ours, coming up (or UNREACHABLE: wait_active asks again)
            self.say(f"queued resource {self.a.name}: ALREADY_EXISTS but {state}: waiting")
        raise PodError(f"could not create {self.a.name}: it keeps reading {state} after a delete")

    def wait_gone(self) -> None:
        """Poll the deleted queued resource until it is gone; a delete that did not take (the
        state is neither DELETING nor gone) is sent again."""
        timeout, t0 = min(self.a.wait_timeout, DELETE_TIMEOUT_S), self.clock()
        state, last = self.state(), None
        while state != "GONE":
            if state != last:
                self.say(f"queued resource {self.a.name}: {state}, waiting for the delete")
                last = state
            if self.clock() - t0 > timeout:
                raise PodError(
                    f"queued resource {self.a.name} still {state} {timeout:.0f} s after its "
                    "delete; cannot recreate it"
                )
            if state not in ("DELETING", "UNREACHABLE"):
                self.g.delete()
            self.sleep(self.a.poll)
            state = self.state()

    def state(self) -> str:
        """g.state(); UNREACHABLE for longer than --host-timeout raises GcloudDown."""
        state = self.g.state()
        if state != "UNREACHABLE":
            self.down_since = None
            return state
        if self.down_since is None:
            self.down_since = self.clock()
        if self.clock() - self.down_since > self.a.host_timeout:
            delete = shlex.join(self.g.base("queued-resources", "delete", self.a.name, "--force"))
            raise GcloudDown(
                f"this machine's gcloud has failed for {self.a.host_timeout:.0f} s "
                f"({self.g.last_error.strip()[-500:]}); queued resource {self.a.name} is left "
                "as it is (not a preemption). Re-run the same `launch/tpu.py up ...` to "
                f"re-attach, or delete it: {delete}"
            )
        return state

    def wait_active(self) -> str:
        """Poll the queued resource until ACTIVE; FAILED or the timeout raise, lost returns."""
        t0, last = self.clock(), None
        while True:
            state = self.state()
            if state != last:
                self.say(f"queued resource {self.a.name}: {state}")
                last = state
            if state == "ACTIVE":
                return state
            if state == "FAILED":
                raise PodError(
                    f"queued resource {self.a.name} FAILED while waiting for capacity (see "
                    f"`gcloud compute tpus queued-resources describe {self.a.name}`)"
                )
            if state in LOST - {"FAILED"}:
                return state
            if self.clock() - t0 > self.a.wait_timeout:
                raise PodError(
                    f"queued resource {self.a.name} not ACTIVE after {self.a.wait_timeout:.0f} s "
                    f"(state {state}); raise --wait-timeout"
                )
            self.sleep(self.a.poll)

    def check_lost(self) -> None:
        """After a failed ssh: SliceLost if the queued resource is going away (ssh to a
        preempted VM exits 1 or 255, as any failure does; only the state tells them apart)."""
        state = self.state()
        if state in LOST:
            self.say(f"queued resource {self.a.name}: {state} (preempted)")
            raise SliceLost(state)

    def failed(self, node: str, r, what: str) -> None:
        """A failed ssh or scp to every worker of `node`: SliceLost if the slice is going
        away, else a PodError naming the worker(s) (or the node) it failed on."""
        self.check_lost()
        failed = [f"{node}-w{w} (exit {c})" for w, c in WORKER_FAILED.findall(r.text)]
        where = ", ".join(failed) or f"{node} (exit {r.code})"
        raise PodError(f"{what} failed on {where}:\n{r.text[-3000:]}")

    def on_every_node(self, command: str, what: str, timeout=None) -> None:
        for node in self.g.nodes():
            r = self.g.ssh(node, "all", command, timeout=timeout)
            if r.code:
                self.failed(node, r, what)

    def upload(self) -> None:
        """--upload: copy the archive of --commit into the home of every worker."""
        for node in self.g.nodes():
            r = self.g.scp(str(self.archive), node, worker.archive_name(self.a))
            if r.code:
                self.failed(node, r, f"upload of {worker.archive_name(self.a)}")

    def setup(self) -> None:
        """The project at --commit and its dependencies on every worker (uploaded first with
        --upload: a recreated slice has fresh VMs)."""
        if self.a.upload:
            self.upload()
        self.on_every_node(worker.setup_command(self.a), "setup", SETUP_SSH_TIMEOUT_S)

    def start(self) -> None:
        """Cleanup on every worker, then training detached on every worker."""
        self.on_every_node(worker.stop_command(), "cleanup")
        with ThreadPoolExecutor(min(16, len(self.hosts))) as pool:
            results = pool.map(
                lambda h: (h, self.g.ssh(h[0], str(h[1]), worker.start_command(self.a, h[2]))),
                self.hosts,
            )
            failed = [(host, r) for (_, _, host), r in results if r.code]
        if failed:
            self.check_lost()
            host, r = failed[0]
            raise PodError(f"could not start {host} (exit {r.code}): {r.text[-2000:]}")

    # --- hosts ---------------------------------------------------------------------------

    def statuses(self) -> dict[str, str] | None:
        """{host: status} from every node, or None when no node answered."""
        found: dict[str, str] = {}
        for node in self.g.nodes():
            r = self.g.ssh(node, "all", worker.status_command(), quiet=True)
            found.update(worker.parse_status(r.out))
        return found or None

    def watch(self) -> tuple[str, str | None]:
        """('done'|'crashed'|'restart'|'lost', host) once training ended, must restart, or
        the slice went away."""
        missing: dict[str, float] = {}  # host -> when it first failed to answer
        while True:
            self.sleep(self.a.poll)
            state = self.state()
            if state in LOST:
                self.say(f"queued resource {self.a.name}: {state} (preempted)")
                return "lost", None
            if state != "ACTIVE":
                missing.clear()  # our gcloud failed: the hosts' silence says nothing
                continue
            st = self.statuses() or {}
            now = self.clock()
            for _, _, h in self.hosts:
                if h in st:
                    missing.pop(h, None)
                else:
                    missing.setdefault(h, now)
            gone = [h for h, t in missing.items() if now - t > self.a.host_timeout]
            if gone:
                self.say(f"{', '.join(gone)} unreachable for {self.a.host_timeout:.0f} s: lost")
                return "lost", None
            codes = {h: int(s.split()[1]) for h, s in st.items() if s.startswith("exit ")}
            crashed = [h for h, c in codes.items() if c and c not in RESTART]
            if crashed:
                return "crashed", crashed[0]
            # a restart code, or training gone with the slice ACTIVE (its VM restarted)
            restart = [h for h, c in codes.items() if c in RESTART]
            restart += [h for _, _, h in self.hosts if st.get(h) == "none"]
            if restart:
                return "restart", restart[0]
            if all(st.get(h) == "exit 0" for _, _, h in self.hosts):
                return "done", None

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
        try:
            return self.run()
        except GcloudDown:
            raise  # the slice's state is unknown: never delete it blind
        except BaseException:  # setup failed, timed out, FAILED, out of retries, Ctrl-C
            self.finish()
            raise

    def run(self) -> int:
        attempt, state = 0, self.g.state()
        if state == "ACTIVE" and self.attached():
            self.say("training is already running on the slice: watching it")
        else:
            attempt = self.bring_up(state, attempt)
        while True:
            outcome, host = self.watch()
            if outcome == "done":
                self.say("training finished")
                self.finish()
                return 0
            if outcome == "crashed":
                # A preempted VM's training may die before the queued resource says so; so
                # do the peers of a preempted slice of a multislice job (collectives fail).
                self.say(
                    f"host {host} exited non-zero: checking the slice in {self.a.crash_grace:.0f} s"
                )
                state = self.recheck()
                if state not in LOST:
                    tail = self.fail_fast(host)
                    self.say(f"host {host} crashed; stopped every host (no recreate). Its log:")
                    print(tail, file=sys.stderr)
                    self.finish()
                    return 1
                self.say(f"queued resource {self.a.name}: {state} (preempted)")
            if outcome == "restart":
                attempt = self.count(attempt, f"host {host} stopped, the slice is intact")
                self.say("restarting training in place; it resumes from its last checkpoint")
                try:
                    self.start()
                    continue
                except SliceLost:
                    attempt -= 1  # no restart happened: the recreate takes this retry
            attempt = self.retry(attempt, "preempted")
            attempt = self.bring_up(self.g.state(), attempt)

    def recheck(self) -> str:
        """After a crash: the queued resource's state as soon as it reads lost, else (ACTIVE)
        after --crash-grace; polled every --poll, so a lagging SUSPENDING is not waited for
        longer than it takes, and an UNREACHABLE answer is asked again, never a crash."""
        t0 = self.clock()
        while True:
            state = self.state()  # UNREACHABLE: ask again (GcloudDown past --host-timeout)
            left = self.a.crash_grace - (self.clock() - t0)
            if state in LOST or (left <= 0 and state != "UNREACHABLE"):
                return state
            self.sleep(min(self.a.poll, left) if left > 0 else self.a.poll)

    def bring_up(self, state: str, attempt: int) -> int:
        """Create the slice unless it exists, wait until ACTIVE, set up and start training."""
        while True:
            if state in LOST:
                self.recreate(state)
            state = self.wait_active()  # WAITING or UNREACHABLE: created earlier, coming up
            if state == "ACTIVE":
                try:
                    self.setup()
                    self.start()
                    break
                except SliceLost as e:
                    state = e.state
            attempt = self.retry(attempt, f"lost while coming up ({state})")
            state = self.g.state()
        self.say(f"training started on {len(self.hosts)} hosts; logs in {self.a.run_dir}/logs/")
        return attempt

    def count(self, attempt: int, why: str) -> int:
        attempt += 1
        if attempt > self.a.retries:
            raise PodError(
                f"{why}, and out of retries ({self.a.retries}); the run resumes "
                "from its last checkpoint when launched again"
            )
        self.say(f"{why} (retry {attempt}/{self.a.retries})")
        return attempt

    def retry(self, attempt: int, why: str) -> int:
        attempt = self.count(attempt, why)
        wait = min(self.a.retry_wait * 2 ** (attempt - 1), 3600)
        self.say(f"delete, recreate and resume in {wait:.0f} s")
        self.g.delete()
        self.sleep(wait)
        return attempt

    def finish(self) -> None:
        if self.a.keep:
            self.say(f"--keep: slice {self.a.name} left running")
        else:
            self.g.delete()


def plan(a, sl: Slice, g: Gcloud, archive=None) -> int:
    """--dry-run of `up`: the commands of one attempt, in order (tpu.archive has printed the
    `git archive` of --upload)."""
    g.create(sl)
    g.out(f"# poll until ACTIVE: {' '.join(g.base('queued-resources', 'describe', a.name))}")
    if a.upload:
        for node in g.nodes():
            g.scp(str(archive), node, worker.archive_name(a))
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
