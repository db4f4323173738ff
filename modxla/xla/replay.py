"""A training step traced once and replayed: no per-step Python tracing on XLA.

On XLA every lazy-tensor step is traced again op by op before its cached executable runs,
and that trace (~0.2 s at 8 layers x d256) does not shrink with the FLOPs. `TracedStep`
traces the step once, compiles the graph whose outputs are the step's results and every
state tensor it updates in place (parameters, AdamW moments), and from then on runs that
executable directly on the current state: the same graph, bound to new inputs.

What the graph reads must be a state tensor, a tensor argument, or a constant. A Python
number that changes between steps (a float learning rate, a host-side step count) would be
frozen in the graph, so the first replay is traced once more and every constant compared
with the capture's; if one changed, the step falls back to tracing every call, with a
warning. Non-tensor arguments and tensor shapes key the cache. The RNG seed advances as
`torch_xla.sync()` advances it, so random ops draw what the traced step would have drawn.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_xla
import torch_xla.core.xla_model as xm

_X = torch_xla._XLAC


@dataclass
class _Graph:
    hash: object
    inputs: list  # per graph input: ("state", i) | ("arg", i) | ("seed", device) | ("const", t)
    updated: list[int]  # state indices the graph writes, in output order
    outputs: list  # per result leaf: ("graph", j) | ("state", i) | ("arg", i) | ("const", t)
    spec: object  # the result's pytree structure
    consts: list  # the constant inputs' host values, to check the next trace against

    def __post_init__(self):
        self.seeds = [(j, v) for j, (kind, v) in enumerate(self.inputs) if kind == "seed"]
        self.const_values = [v for kind, v in self.inputs if kind == "const"]
        self.pick: list[int] | None = None  # per input, its index in state + args + consts


class TracedStep:
    """`fn(*args)` on XLA, traced at most a few times per input signature.

    `state()` lists the persistent tensors `fn` reads or updates in place, in a stable
    order (e.g. parameters, buffers, optimizer state, learning-rate tensors). `fn` returns
    a pytree of tensors. Calls while `state()` still grows (AdamW builds its moments at the
    first step) are traced normally.
    """

    def __init__(
        self, fn: Callable, state: Callable[[], list[torch.Tensor]], name: str, sync: bool = True
    ):
        self.fn, self.state, self.name = fn, state, name
        # After a replay, torch_xla.sync() advances the RNG seed and runs step closures, as
        # a traced step's sync would. A step that draws no random numbers and registers no
        # closures (decoding) can skip it: it costs ~0.2 ms of host time per call.
        self.sync = sync
        self.graphs: dict[tuple, _Graph | None] = {}  # None: this signature is traced each call
        self.traces = 0  # how many calls traced `fn` (the rest replayed)
        self._replayed = False

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        key = tuple(
            ("T", tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else ("V", a)
            for a in args
        )
        graph = self.graphs.get(key, False)
        if graph is None:
            return self._trace(args)
        if graph is False:
            return self._capture(key, args, tensors, check=None)
        if graph.consts is not None:  # first replay: trace again and compare the constants
            return self._capture(key, args, tensors, check=graph)
        return self._replay(graph, tensors)

    def _trace(self, args):
        self.traces += 1
        with _graph_name(self.name):
            out = self.fn(*args)
        return self._sync(out)

    def _capture(self, key, args, tensors, check: _Graph | None):
        """Trace `fn`; capture its graph, or (`check`) compare it with the captured one."""
        state = self.state()
        if self._replayed:
            # A replayed buffer names the tensor the trace created, not its holder, and
            # state tensors with equal values share one: give each a buffer of its own, so
            # graph inputs map back to it and the graph is the one captured.
            with torch.no_grad():
                for t in state:
                    t.copy_(t.clone())
        torch_xla.sync()
        xm.wait_device_ops()  # inputs must be device data, not pending placeholders
        slots = {_X._xla_get_tensor_id(t): ("state", i) for i, t in enumerate(state)}
        slots.update({_X._xla_get_tensor_id(t): ("arg", i) for i, t in enumerate(tensors)})
        self.traces += 1
        with _graph_name(self.name):
            out = self.fn(*args)
        if [id(t) for t in self.state()] != [id(t) for t in state]:  # state still forming
            return self._sync(out)
        leaves, spec = torch.utils._pytree.tree_flatten(out)
        pending = _X._check_tensor_need_materialization(state)
        updated = [i for i, p in enumerate(pending) if p]
        roots, outputs, seen = [state[i] for i in updated], [], {}
        for t in roots:
            seen.setdefault(_X._unique_id_for_ir_and_data(t), len(seen))
        for leaf in leaves:
            uid = _X._unique_id_for_ir_and_data(leaf)
            if uid in seen:
                outputs.append(("graph", seen[uid]))
            elif _X._check_tensor_need_materialization([leaf])[0]:
                seen[uid] = len(seen)
                roots.append(leaf)
                outputs.append(("graph", seen[uid]))
            else:  # plain device data: an input returned as is, or a constant
                outputs.append(slots.get(_X._xla_get_tensor_id(leaf), ("const", leaf)))
        xm.wait_device_ops()  # constants the trace uploaded are in flight
        ids, values = _X._get_tensors_xla_device_data_node(roots)
        graph_hash = _X._get_graph_hash(roots)
        if check is not None:  # the same graph has its inputs in the same order
            same = graph_hash == check.hash and len(values) == len(check.inputs)
            consts = [v for (k, _), v in zip(check.inputs, values, strict=False) if k == "const"]
            if not (same and _same([v.cpu() for v in consts], check.consts)):
                warnings.warn(
                    f"{self.name}: a value the step reads changes between calls without "
                    "being a tensor argument or state (e.g. a Python float); it is traced "
                    "every call",
                    stacklevel=3,
                )
                self.graphs[key] = None
                return self._sync(out)
            check.consts = None  # checked: replay from now on
            graph = check
        else:
            inputs = [_source(tid, v, slots) for tid, v in zip(ids, values, strict=True)]
            consts = [v.cpu() for kind, v in inputs if kind == "const"]
            with _graph_name(self.name):
                _X._xla_warm_up_cache(roots, [])  # compiles once; a cache hit when seen before
            graph = _Graph(graph_hash, inputs, updated, outputs, spec, consts)
            self.graphs[key] = graph
        # Run this step from the traced inputs, then drop its pending trace.
        results = _X._run_cached_graph(graph.hash, values)
        if len(results) != len(roots):
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(roots)} outputs")
        _X._clear_pending_irs(str(torch_xla.device()))
        return self._finish(graph, state, tensors, results)

    def _sync(self, out):
        with _graph_name(self.name):
            torch_xla.sync()
        return out

    def _replay(self, graph: _Graph, tensors: list[torch.Tensor]):
        state = self.state()
        live = state + tensors
        flags = _X._check_tensor_need_materialization(live)
        if any(flags):  # e.g. a learning rate written in place since the last step
            pending = [t for t, p in zip(live, flags, strict=True) if p]
            _X._xla_sync_multi(pending, devices=[], wait=True, sync_xla_data=True)
        if graph.pick is None:
            graph.pick = _positions(graph.inputs, len(state), len(tensors))
        pool = live + graph.const_values
        values = [pool[j] for j in graph.pick]  # decoding's ~125: no branch per input
        for j, device in graph.seeds:
            values[j] = _next_seed(device)
        results = _X._run_cached_graph(graph.hash, values)
        return self._finish(graph, state, tensors, results)

    def _finish(self, graph: _Graph, state, tensors, results):
        for j, i in enumerate(graph.updated):
            # Through functionalization, so views and .detach() of the tensor see it too.
            torch._functionalize_replace(state[i], torch._from_functional_tensor(results[j]))
            torch._functionalize_commit_update(state[i])
        self._replayed = True
        where = {"state": state, "arg": tensors, "graph": results}
        leaves = [v if kind == "const" else where[kind][v] for kind, v in graph.outputs]
        if self.sync or graph.seeds:
            torch_xla.sync()  # nothing pending: advances the RNG seed and runs step closures
        return torch.utils._pytree.tree_unflatten(leaves, graph.spec)


def _positions(inputs: list, n_state: int, n_args: int) -> list[int]:
    """Per graph input, its index in state + args + the graph's constants."""
    out, const = [], n_state + n_args
    for kind, v in inputs:
        if kind == "const":
            out.append(const)
            const += 1
        else:  # a seed input is replaced at each replay: any index will do
            out.append(v if kind == "state" else n_state + v if kind == "arg" else 0)
    return out


def _next_seed(device: str) -> torch.Tensor:
    """torch_xla.compile syncs before a step, which advances the RNG seed: so does a replay."""
    xm.set_rng_state((1012031 + xm.get_rng_state(device) * 7012063) % 2**64, device)
    return _X._get_base_seed_as_tensor(device)


def _source(tid: int, value: torch.Tensor, slots: dict) -> tuple:
    """Where a graph input comes from at replay: state, an argument, the RNG seed, or itself."""
    if tid in slots:
        return slots[tid]
    if tid == _X._get_seed_info_id():
        return ("seed", str(value.device))
    return ("const", value)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        for x, y in zip(a, b, strict=True)
    )


@contextlib.contextmanager
def _graph_name(name: str):
    """Names the graphs compiled inside (metrics and dumps show it)."""
    saved = _X._get_current_graph_name()
    _X._set_current_graph_name(name)
    try:
        yield
    finally:
        _X._set_current_graph_name(saved)
