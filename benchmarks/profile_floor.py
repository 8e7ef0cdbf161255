"""Where the DT training step's and the evaluation forward's time goes: a shape-aware FLOP floor.

    python benchmarks/profile_floor.py [--repeats 7] [--steps 20] [--calls 20] [--dot_s 0.05]
                                       [--only train_h128|train_h512|eval_h128] [--json PATH]
                                       [--trace] [--hidden H --layers L --batch B --peak_n N]  (toy: tests)

`train_step.py`'s floor puts every FLOP of the step at the 2048^2 `jnp.dot` peak, but a DT's dots
are small ((B*3K) x H by H x 3H, per-head 3K x 3K attention, ...) and XLA:CPU runs those well
below that peak, so a fraction of that floor says little about what is left to gain. Here the floor
is counted per shape. For each workload, the exact jitted function the project runs:
- `train_h128`, `train_h512`: `mdt_jax.train.make_train_step` on train_step.py's shapes, pool and
  sampler (K=20, batch 64, dropout 0.1, AdamW, clip 0.25), timed as train_step.py times it: a
  fused `lax.scan` of `--steps` steps (`make_train_chunk`) divided by `--steps`;
- `eval_h128`: `mdt_jax.evaluate.native_step` (M=1 candidate, as the evaluation loop calls it:
  params stacked twice once and for all, one computed, its token cache donated and carried from
  call to call, host observations in and actions read back to the host; H128 L3 1 head relu,
  S=11, A=3, K=20, at step 30, past the ring's wrap) at b = 8, 16, 32, 64 episodes, one blocking
  call per step (the mean of `--calls` calls); its dots and FLOPs are those of the one
  `policy_step` its loop runs (the loop's trip count is not static), and XLA's FLOPs of the exact
  last-token forward on the window (no cache) are printed beside them;
every `dot_general` of its jaxpr (sub-jaxprs included; a scan body counts its length times) is
counted by (operand shapes, dtypes, dimension numbers), and each distinct dot is timed alone: a
jitted `lax.fori_loop` of R of it on random float32 inputs, each repetition adding 1e-20 x the
max of its output to its lhs so that XLA can neither hoist nor drop it (that max and add are
counted in the dot's time: nothing is subtracted, so a dot's time alone is an upper bound on its
own). Printed per workload: the measured time (median of `--repeats`), the naive floor (XLA's
`cost_analysis` FLOPs / the matmul peak of the same run), the shape-aware dot time (the sum of
count x time alone), their fractions of the measured time, and the rest (measured - dot time: the
softmax, layer norms, dropout hash, AdamW, gathers, dispatch; negative where XLA:CPU overlaps
independent dots), with a table of the dot shapes that take the most time. The jaxpr's dot FLOPs
are checked against XLA's FLOPs of the compiled function (XLA counts elementwise FLOPs too, so the
ratio is below 1 unless XLA dropped or rewrote a dot).

With `--trace`, one more timed call of each workload runs under the XLA profiler, and every thunk
of the compiled program (a fusion or an op; its events carry the HLO instruction's name) is timed
as it ran, inside the real program rather than alone, and put in the first category whose ops it
holds (`CATEGORIES`: a fusion holding a dot is a dot; then random bits (the dropout hash, the
sampler's threefry), transposes and copies, reductions (softmax, layer norms, bias gradients), the
activation, ...). Printed: the time per category, the sum of all thunks against the call's wall
time under the trace (the gap is dispatch and host work), and the largest thunks that are not dots.
Each dot thunk's dots are read from the HLO (`hlo_dots`), so the largest dot thunks are printed
with their shapes and their rate inside the program, and the dots' time and rate are summed by the
kernel that runs them (YNNPACK's fusions, XLA's own dot emitter). A rate above the matmul peak
means the thunks' events end before their work does: XLA's own emitter hands the product to
Eigen's pool, and that work then runs beside the thunks after it (on the H512 step, the weight
gradients: their time shows up as slower YNNPACK dots running at the same moment).

`--json` holds per workload row (`train_h128`, `train_h512`, `eval_h128_b8`, ...) the figures,
`trace` (with `--trace`) and the common keys (`benchmarks/_common.py`: `floor_fraction` is the
naive floor's, `speedup` and `speedup_vs_batched` null: no peer; training's `warm_s`/`cold_s` are
seconds per call of `--steps` steps, as in train_step.py).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import evaluate as E, train_step as TS  # noqa: E402
from benchmarks._common import chunk_timer, common_keys, common_line, matmul_peak, memory_bandwidth, traced  # noqa: E402
from mdt_jax import evaluate as ev, train as T  # noqa: E402
from mdt_jax.models import DTConfig, init_params  # noqa: E402

WORKLOADS = ("train_h128", "train_h512", "eval_h128")
EVAL_SHAPE = dict(hidden_size=128, n_layer=3, n_head=1, activation="relu")
EVAL_BATCHES = (8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Dot:
    """One distinct `dot_general`: what XLA sees of it."""

    lhs: tuple
    rhs: tuple
    lhs_dtype: str
    rhs_dtype: str
    dims: tuple          # ((lhs contracting, rhs contracting), (lhs batch, rhs batch))
    precision: object
    out_dtype: object    # preferred_element_type

    @property
    def flops(self) -> int:
        """2 x batch x lhs free x rhs free x contracting."""
        (_, rc), (_, rb) = self.dims
        rhs_free = math.prod(n for i, n in enumerate(self.rhs) if i not in rc and i not in rb)
        return 2 * math.prod(self.lhs) * rhs_free

    @property
    def kind(self) -> str:
        """'nn' x @ w, 'nt' x @ w.T (an input gradient), 'tn' x.T @ g (a weight gradient), 'tt'
        for 2-D dots; 'batched' with batch dims (attention)."""
        (lc, rc), (lb, _) = self.dims
        if lb or len(self.lhs) != 2 or len(self.rhs) != 2:
            return "batched"
        return {((1,), (0,)): "nn", ((1,), (1,)): "nt", ((0,), (0,)): "tn", ((0,), (1,)): "tt"}.get((lc, rc), "other")

    def label(self) -> str:
        (lc, rc), (lb, rb) = self.dims
        s = f"{'x'.join(map(str, self.lhs))} . {'x'.join(map(str, self.rhs))}"
        return s + (f" c{list(lc)}{list(rc)}" + (f" b{list(lb)}{list(rb)}" if lb else ""))


def _dot(eqn) -> Dot:
    x, y = (v.aval for v in eqn.invars)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return Dot(tuple(x.shape), tuple(y.shape), str(x.dtype), str(y.dtype), dims, eqn.params.get("precision"),
               eqn.params.get("preferred_element_type"))


def count_dots(jaxpr) -> collections.Counter:
    """{Dot: how many run per call} over a (closed) jaxpr and every sub-jaxpr (jit, custom_jvp/vjp,
    remat, ...; a scan body its length times). A while loop or a cond holding a dot is refused:
    its count is not known from the jaxpr."""
    out = collections.Counter()
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "dot_general":
            out[_dot(eqn)] += 1
            continue
        n = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jcore.jaxprs_in_params(eqn.params):
            inner = count_dots(sub)
            if inner and eqn.primitive.name in ("while", "cond"):
                raise ValueError(f"a {eqn.primitive.name} holds {sum(inner.values())} dot(s): their count per call "
                                 "is not static")
            for d, k in inner.items():
                out[d] += n * k
    return out


def xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def time_dot(d: Dot, repeats: int, target_s: float, peak: float) -> tuple[float, int]:
    """Seconds of one `d` alone (median of `repeats` calls of a fori_loop of R of it, / R) and R.

    R aims each call at `target_s`, guessing a quarter of the peak (and at least 2 us a dot)."""
    guess = max(d.flops / (0.25 * peak * 1e9), 2e-6)
    reps = int(min(max(round(target_s / guess), 3), 20_000))
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal(d.lhs), d.lhs_dtype)
    y = jnp.asarray(r.standard_normal(d.rhs), d.rhs_dtype)

    def loop(x, y):
        def body(_, x):
            out = lax.dot_general(x, y, d.dims, precision=d.precision, preferred_element_type=d.out_dtype)
            return x + (1e-20 * jnp.max(out)).astype(x.dtype)
        return lax.fori_loop(0, reps, body, x)

    f = jax.jit(loop)
    f(x, y).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, y).block_until_ready()
        ts.append((time.perf_counter() - t) / reps)
    return statistics.median(ts), reps


@dataclasses.dataclass
class Workload:
    """A jitted function as the project runs it: its jaxpr, XLA's FLOPs, its first call and a warm
    timer (seconds per step or forward); `per_call` steps make one call (common keys)."""

    name: str
    config: dict
    jaxpr: object
    xla_flops: float
    cold_s: float
    run: callable
    per_call: int = 1
    units: int = 1       # steps or forwards one `run()` executes (a trace's times are divided by it)
    hlo: str = ""        # the optimised HLO of the executable `run()` calls (names its thunks)
    last_flops: float | None = None  # eval: XLA's FLOPs of the exact last-token forward (no cache)


def _init(f, abstract: bool):
    """f() jitted (eager init compiles op by op, several times slower), or its shapes only."""
    return jax.eval_shape(f) if abstract else jax.jit(f)()


def train_parts(shape: str, hidden=None, layers=None, batch=None, abstract=False):
    """(cfg, step, chunk, state, data) of train_step.py's step: its shapes, pool and sampler;
    `hidden`/`layers`/`batch` shrink it; `abstract`: the state's shapes only."""
    s = TS.SHAPES[shape] | {k: v for k, v in (("hidden_size", hidden), ("n_layer", layers)) if v}
    B = batch or TS.B
    cfg = DTConfig(state_dim=TS.S, act_dim=TS.A, context_len=TS.K, **s)
    tcfg = T.TrainConfig(batch_size=B, warmup_steps=10_000)
    data = jax.tree.map(jnp.asarray, TS.pool())
    sample = lambda d, k: jax.tree.map(lambda x: x[jax.random.randint(k, (B,), 0, TS.POOL)], d)
    state = _init(lambda: T.init_state(cfg, tcfg, jax.random.key(0)), abstract)
    return cfg, T.make_train_step(cfg, tcfg, sample), T.make_train_chunk(cfg, tcfg, sample), state, data


def eval_parts(b: int, hidden=None, layers=None, abstract=False):
    """(cfg, params, cache, obs, rtg) of one candidate's policy step on b episodes: random weights,
    observations and return-to-go, an empty token cache; `abstract`: the params' shapes only."""
    s = EVAL_SHAPE | {k: v for k, v in (("hidden_size", hidden), ("n_layer", layers)) if v}
    cfg = DTConfig(state_dim=TS.S, act_dim=TS.A, context_len=TS.K, **s)
    params = _init(lambda: init_params(cfg, jax.random.key(0)), abstract)
    r = np.random.default_rng(0)
    obs = jnp.asarray(r.normal(size=(b, TS.S)), jnp.float32)
    rtg = jnp.asarray(r.uniform(0, 3.6, size=(b,)), jnp.float32)
    return cfg, params, ev.TokenCache.zeros(b, cfg), obs, rtg


EVAL_T = 30  # the step evaluated: past the ring's first wrap (K = 20), every slot written


def _step(cfg: DTConfig):
    """One candidate's policy step: the body `native_step`'s loop runs once per candidate."""
    return lambda params, cache, obs, rtg: ev.policy_step(cfg, params, cache, jnp.int32(EVAL_T), obs, rtg)


def _policy_args(cfg: DTConfig, params, cache, obs, rtg) -> tuple:
    """`native_step`'s arguments for one candidate as the evaluation loop (`evaluate._NativeDT`)
    passes them: the params stacked twice once and for all (on the device), the caches stacked
    twice, observations and rtg as host arrays, one candidate computed (`n` = 1, `order` [0, 0])."""
    two = lambda x: np.stack([np.asarray(x)] * 2)
    return (cfg, False, jax.tree.map(lambda x: jnp.stack([x, x]), params), jax.tree.map(lambda x: jnp.stack([x, x]), cache),
            two(obs), two(rtg), np.int32(EVAL_T), None, np.int32(1), np.zeros(2, np.int32))


def train_jaxpr(shape: str, hidden=None, layers=None, batch=None):
    """The step's jaxpr, traced only (nothing compiled)."""
    _, step, _, state, data = train_parts(shape, hidden, layers, batch, abstract=True)
    return jax.make_jaxpr(step)(state, data)


def eval_jaxpr(b: int, hidden=None, layers=None):
    """The policy step's jaxpr, traced only (nothing compiled)."""
    cfg, *args = eval_parts(b, hidden, layers, abstract=True)
    return jax.make_jaxpr(_step(cfg))(*args)


def _config(cfg: DTConfig, batch: int) -> dict:
    return {"hidden_size": cfg.hidden_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "activation": cfg.activation, "context_len": cfg.context_len, "batch": batch}


def train_workload(shape: str, steps: int, hidden=None, layers=None, batch=None) -> Workload:
    """The step timed as train_step.py times it: `steps` steps in one fused call, / steps."""
    cfg, step, chunk, state, data = train_parts(shape, hidden, layers, batch)
    jaxpr = jax.make_jaxpr(step)(state, data)
    flops = xla_flops(jax.jit(step).lower(state, data).compile())
    hlo = chunk.lower(state, data, steps).compile().as_text()  # before the donating first call
    run, cold_s = chunk_timer(chunk, state, data, steps)
    return Workload(f"train_{shape}", _config(cfg, batch or TS.B), jaxpr, flops, cold_s, run, steps, steps, hlo)


def eval_workload(b: int, calls: int, hidden=None, layers=None) -> Workload:
    """The policy step timed one blocking call at a time (the mean of `calls`), as the loop calls it:
    the caches donated and carried from call to call, the actions read on the host."""
    cfg, *args = eval_parts(b, hidden, layers)
    loop_args = list(_policy_args(cfg, *args))

    def call():
        a, loop_args[3] = ev.native_step(*loop_args)
        np.asarray(a)  # the loop reads the actions on the host

    t = time.perf_counter()
    call()  # before the lowering below, so that the compilation is this call's
    cold_s = time.perf_counter() - t
    hlo = ev.native_step.lower(*loop_args).compile().as_text()  # on the carried cache (the first was donated)
    jaxpr = jax.make_jaxpr(_step(cfg))(*args)
    flops = xla_flops(jax.jit(_step(cfg)).lower(*args).compile())

    def run() -> float:
        t = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - t) / calls

    return Workload(f"eval_h128_b{b}", _config(cfg, b), jaxpr, flops, cold_s, run, 1, calls, hlo,
                    E.xla_flops(cfg, args[0], b))  # the floor benchmarks/evaluate.py quotes


# Categories of a thunk (one fusion or op of the compiled program), in the order they are tested.
CATEGORIES = ("dot", "random bits", "transpose or copy", "reduce", "activation", "concatenate",
              "gather, slice or pad", "broadcast", "other elementwise")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")  # name, type, op, rest
_CONTAINERS = {"while", "conditional", "call"}  # their bodies' thunks are traced one by one
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")  # the computation a fusion runs


def hlo_ops(hlo: str) -> dict[str, collections.Counter]:
    """{instruction name: Counter of the ops it runs} over an optimised HLO module's text: a fusion
    counts the ops of the computation it calls (nested fusions included), any other op itself."""
    comps, instrs, cur = {}, {}, None
    for line in hlo.splitlines():
        if m := _HEADER.match(line):
            cur = comps.setdefault(m.group(1), [])
        elif (m := _INSTR.match(line)) and cur is not None:
            name, _, op, rest = m.groups()
            called = _CALLS.search(rest) if op == "fusion" else None
            cur.append((op, called.group(1) if called else None))
            instrs[name] = (op, called.group(1) if called else None)

    def ops(op, called, seen=()):
        if called is None or called in seen:
            return collections.Counter([op])
        out = collections.Counter()
        for o, c in comps.get(called, []):
            out += ops(o, c, seen + (called,)) if o == "fusion" else collections.Counter([o])
        return out

    return {name: ops(op, called) for name, (op, called) in instrs.items()}


_SIZES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_DTYPE = r"pred|[fsu]\d+|bf16"
_ARRAY = re.compile(rf"\b({_DTYPE})\[([\d,]*)\]")


def _nbytes(types: str) -> int:
    """Bytes of the arrays in an HLO type string (an array or a tuple of them)."""
    return sum(_SIZES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(types))


def hlo_bytes(hlo: str) -> dict[str, tuple[int, int]]:
    """{instruction name: (result bytes, operand bytes)} over an optimised HLO module's text: what
    a thunk writes, and the sizes of the operands it reads (whole; a dynamic slice inside a fusion
    reads less of its operand, so the second is an upper bound on what is read)."""
    size, ops = {}, {}
    for line in hlo.splitlines():
        if m := _INSTR.match(line):
            name, types, _, rest = m.groups()
            size[name] = _nbytes(types)
            args = rest.split("), ")[0] if "), " in rest else rest.rsplit(")", 1)[0]
            ops[name] = re.findall(r"%([\w.\-]+)", args)
    return {name: (size[name], sum(size.get(o, 0) for o in operands)) for name, operands in ops.items()}


_PARAM = re.compile(rf"([\w.\-]+):\s*((?:{_DTYPE})\[[\d,]*\])")  # a computation's parameter and its type


def _dims(t: str) -> tuple[int, ...]:
    m = _ARRAY.search(t)
    return tuple(int(d) for d in m.group(2).split(",") if d) if m else ()


def hlo_dots(hlo: str) -> dict[str, list[tuple[int, str]]]:
    """{thunk name: [(FLOPs, 'lhs . rhs c[...][...]') per dot it runs]} over an optimised HLO module's
    text: a top-level `dot` is its own thunk, a dot inside a fused computation belongs to the
    fusion that calls it (YNNPACK's `ynn_fusion`s and XLA's own dot fusions alike), so a traced
    thunk's time gives that dot's rate inside the running program. The shapes are the operands'
    logical dims (`in . in c[lhs contracting][rhs contracting]`)."""
    types: dict[str, dict[str, str]] = {}
    found: list[tuple[str, str, int, str]] = []  # (computation, instruction, FLOPs, label)
    callers: dict[str, str] = {}  # fused computation: the fusion instruction calling it
    where: dict[str, str] = {}  # fusion instruction: the computation it sits in
    cur = None
    for line in hlo.splitlines():
        if m := _HEADER.match(line):
            cur = m.group(1)
            types[cur] = dict(_PARAM.findall(line.split("->")[0]))
        elif (m := _INSTR.match(line)) and cur is not None:
            name, t, op, rest = m.groups()
            types[cur][name] = t
            if op == "fusion" and (c := _CALLS.search(rest)):
                callers[c.group(1)], where[name] = name, cur
            if op == "dot":
                lhs, rhs = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])[:2]
                a, b = _dims(types[cur].get(lhs, "")), _dims(types[cur].get(rhs, ""))
                cl, cr = ([int(d) for d in re.search(side + r"_contracting_dims=\{([\d,]*)\}", rest).group(1).split(",")
                           if d] for side in ("lhs", "rhs"))
                flops = 2 * math.prod(_dims(t)) * math.prod(a[i] for i in cl)
                found.append((cur, name, flops, f"{'x'.join(map(str, a))} . {'x'.join(map(str, b))} c{cl}{cr}"))
    out: dict[str, list[tuple[int, str]]] = {}
    for comp, name, flops, label in found:
        owner = name
        while comp in callers:  # inside a fusion: the thunk is the outermost fusion calling it
            owner = callers[comp]
            comp = where[owner]
        out.setdefault(owner, []).append((flops, label))
    return out


def categorise(ops: collections.Counter) -> str | None:
    """A thunk's category (CATEGORIES) from its ops; None for a loop or call, whose body's thunks
    are traced one by one."""
    has = lambda *names: any(ops.get(n) for n in names)
    if has(*_CONTAINERS):
        return None
    if has("dot", "convolution", "custom-call"):
        return "dot"
    if has("xor", "shift-right-logical"):
        return "random bits"  # dropout's counter hash (`dropout_bits`) or the sampler's threefry
    if has("transpose", "copy"):
        return "transpose or copy"
    if has("reduce", "reduce-window"):
        return "reduce"
    if has("tanh", "maximum", "erf"):
        return "activation"
    if has("concatenate"):
        return "concatenate"
    if has("gather", "scatter", "slice", "dynamic-slice", "dynamic-update-slice", "pad"):
        return "gather, slice or pad"
    if set(ops) <= {"broadcast", "parameter", "bitcast", "constant", "reshape"}:
        return "broadcast"
    return "other elementwise"


def trace_thunks(w: Workload, top: int = 12, bandwidth: float | None = None, peak: float | None = None) -> dict:
    """One `w.run()` under the XLA profiler: every thunk's time, by category, per step or forward.

    The thunks are read from the trace's XLA CPU threads (their events are named after the HLO
    instructions of `w.hlo`) and summed by name; `thunk_ms` is their sum, `traced_ms` the call's
    wall time under the trace (the difference: dispatch and host work, or thunks overlapping on
    the two threads if negative). Per category also the bytes its thunks write (their results) and
    at most read (their operands, `hlo_bytes`) per step or forward; with `bandwidth` (GB/s,
    `_common.memory_bandwidth`), `memory_ms`: the time the thunks that are not dots need at that
    bandwidth just to write their results (a floor), and to write them and read their operands
    (at most)."""
    ops, nbytes, dots = hlo_ops(w.hlo), hlo_bytes(w.hlo), hlo_dots(w.hlo)
    traced_s, events = traced(w.run)
    per, runs = collections.Counter(), collections.Counter()
    for _, name, _, ns in events:
        if name in ops:
            per[name] += ns
            runs[name] += 1
    cats = {c: {"ms": 0.0, "thunks": 0, "written_mb": 0.0, "read_mb": 0.0} for c in CATEGORIES}
    rows = []
    for name, ns in per.items():
        c = categorise(ops[name])
        if c is None:
            continue
        ms = ns / 1e6 / w.units
        written, read = (runs[name] / w.units * b / 1e6 for b in nbytes.get(name, (0, 0)))
        cats[c]["ms"] += ms
        cats[c]["thunks"] += 1
        cats[c]["written_mb"] += written
        cats[c]["read_mb"] += read
        rows.append({"thunk": name, "category": c, "ms": ms, "written_mb": written, "read_mb": read,
                     "ops": ",".join(f"{o}" + (f"x{n}" if n > 1 else "") for o, n in ops[name].most_common(6))})
        if name in dots:  # the dot's rate inside the running program
            flops = runs[name] / w.units * sum(f for f, _ in dots[name])
            rows[-1] |= {"dot": " + ".join(lbl for _, lbl in dots[name]), "gflop": flops / 1e9,
                         "gflops": flops / (ms / 1e3) / 1e9 if ms > 0 else None,
                         "emitter": "YNNPACK" if "ynn" in name else "XLA"}
    if not rows:
        raise RuntimeError(f"{w.name}: no thunk of the compiled program was found in the trace")
    rows.sort(key=lambda r: -r["ms"])
    total = sum(c["ms"] for c in cats.values())
    out = {"traced_ms": 1e3 * traced_s / w.units, "thunk_ms": total, "categories": cats,
           "top_not_dot": [r for r in rows if r["category"] != "dot"][:top],
           "top_dots": [r for r in rows if "dot" in r][:top], "dots_by_emitter": {}}
    for r in rows:  # the dots' time and rate by the kernel that runs them
        if "dot" in r:
            e = out["dots_by_emitter"].setdefault(r["emitter"], {"ms": 0.0, "gflop": 0.0, "thunks": 0})
            e["ms"] += r["ms"]
            e["gflop"] += r["gflop"]
            e["thunks"] += 1
    for e in out["dots_by_emitter"].values():
        e["gflops"] = e["gflop"] / (e["ms"] / 1e3) if e["ms"] > 0 else None
        # faster than the matmul peak: the thunks' events end before their work does (XLA's own
        # dot emitter hands the product to Eigen's pool), which then overlaps the thunks after them
        e["events_span_work"] = None if peak is None or e["gflops"] is None else e["gflops"] <= 1.2 * peak
    if bandwidth:
        other = [v for c, v in cats.items() if c != "dot"]
        written, read = sum(v["written_mb"] for v in other), sum(v["read_mb"] for v in other)
        out["memory"] = {"bandwidth_gbs": bandwidth, "not_dot_ms": sum(v["ms"] for v in other),
                         "written_mb": written, "read_mb": read, "write_ms": written / bandwidth,
                         "write_read_ms": (written + read) / bandwidth}
    return out


def print_trace(t: dict) -> None:
    print(f"  trace of one call: thunks {t['thunk_ms']:.3f} ms of {t['traced_ms']:.3f} ms traced, by category:")
    for c, v in sorted(t["categories"].items(), key=lambda kv: -kv[1]["ms"]):
        if v["thunks"]:
            print(f"    {c:22} {v['ms']:9.3f} ms {v['ms'] / t['thunk_ms']:6.1%} ({v['thunks']} thunks; writes "
                  f"{v['written_mb']:.1f} MB, reads <= {v['read_mb']:.1f} MB)")
    if m := t.get("memory"):
        print(f"  the thunks that are not dots take {m['not_dot_ms']:.3f} ms; they write {m['written_mb']:.1f} MB and "
              f"read at most {m['read_mb']:.1f} MB: at the measured {m['bandwidth_gbs']:.1f} GB/s that is "
              f"{m['write_ms']:.3f} ms for the writes alone, {m['write_read_ms']:.3f} ms with the reads")
    for k, e in t.get("dots_by_emitter", {}).items():
        print(f"  dots run by {k}: {e['thunks']} thunks, {e['ms']:.3f} ms, {e['gflop']:.3f} GFLOP, "
              f"{e['gflops'] or 0:.1f} GFLOP/s inside the program"
              + (" (above the peak: the events end before the work, which overlaps the thunks after them)"
                 if e.get("events_span_work") is False else ""))
    if t.get("top_dots"):
        print("  the largest dot thunks, as they ran inside the program:")
        for r in t["top_dots"]:
            print(f"    {r['ms']:9.3f} ms  {r['gflops'] or 0:6.1f} GFLOP/s  {r['emitter']:7} {r['thunk'][:24]:24} {r['dot'][:60]}")
    print("  the largest thunks that are not dots:")
    for r in t["top_not_dot"]:
        print(f"    {r['ms']:9.3f} ms  {r['category']:20} {r['thunk'][:34]:34} {r['ops'][:70]}")


def profile(w: Workload, repeats: int, peak: float, dot_s: float, cache: dict) -> dict:
    """The figures of one workload; `cache` keeps each distinct dot's time alone across workloads."""
    ts = [w.run() for _ in range(repeats)]
    measured = statistics.median(ts)
    dots = count_dots(w.jaxpr)
    rows = []
    for d, n in dots.items():
        if d not in cache:
            cache[d] = time_dot(d, repeats, dot_s, peak)
        alone, reps = cache[d]
        rows.append({"dot": d.label(), "kind": d.kind, "lhs": list(d.lhs), "rhs": list(d.rhs),
                     "dimension_numbers": [[list(x) for x in p] for p in d.dims], "count": n, "flops": d.flops,
                     "alone_ms": 1e3 * alone, "reps": reps, "gflops": d.flops / alone / 1e9,
                     "total_ms": 1e3 * n * alone})
    rows.sort(key=lambda r: -r["total_ms"])
    dot_flops = sum(d.flops * n for d, n in dots.items())
    dot_s_total = sum(r["total_ms"] for r in rows) / 1e3
    naive = w.xla_flops / (peak * 1e9)
    return {"config": w.config, "measured_ms": 1e3 * measured, "measured_ms_all": [1e3 * t for t in ts],
            "xla_gflop": w.xla_flops / 1e9, "dot_gflop": dot_flops / 1e9,
            "dot_over_xla_flops": dot_flops / w.xla_flops if w.xla_flops else None,
            "naive_floor_ms": 1e3 * naive, "dot_ms": 1e3 * dot_s_total, "rest_ms": 1e3 * (measured - dot_s_total),
            "naive_fraction": naive / measured, "dot_fraction": dot_s_total / measured,
            "rest_fraction": (measured - dot_s_total) / measured,
            "dot_gflops": dot_flops / dot_s_total / 1e9, "measured_gflops": w.xla_flops / measured / 1e9,
            "distinct_dots": len(rows), "dots_per_call": sum(dots.values()), "dots": rows,
            "last_forward_gflop": None if w.last_flops is None else w.last_flops / 1e9,
            "last_forward_floor_fraction": None if w.last_flops is None else w.last_flops / (peak * 1e9) / measured,
            } | common_keys(
        warm_s=measured * w.per_call, cold_s=w.cold_s, floor_s=naive * w.per_call)


def print_row(name: str, r: dict, top: int) -> None:
    print(f"\n{name} {r['config']}")
    print(f"  measured {r['measured_ms']:.3f} ms ({r['measured_gflops']:.1f} GFLOP/s of XLA's {r['xla_gflop']:.4f} "
          f"GFLOP); jaxpr dots {r['dot_gflop']:.4f} GFLOP = {r['dot_over_xla_flops']:.3f} x XLA's FLOPs, "
          f"{r['dots_per_call']} dots of {r['distinct_dots']} shapes")
    print(f"  naive floor {r['naive_floor_ms']:.3f} ms ({r['naive_fraction']:.2f} of measured); shape-aware dot time "
          f"{r['dot_ms']:.3f} ms ({r['dot_fraction']:.2f}; {r['dot_gflops']:.1f} GFLOP/s); rest {r['rest_ms']:.3f} ms "
          f"({r['rest_fraction']:.2f})")
    if r.get("last_forward_gflop") is not None:
        print(f"  the exact last-token forward (no cache) is {r['last_forward_gflop']:.4f} GFLOP: its floor is "
              f"{r['last_forward_floor_fraction']:.2f} of measured")
    print(f"  {'dot (lhs . rhs, contracting, batch)':48} {'kind':>7} {'n':>3} {'MFLOP':>8} {'ms alone':>9} "
          f"{'GFLOP/s':>8} {'ms total':>9} {'share':>6}")
    for d in r["dots"][:top]:
        print(f"  {d['dot']:48} {d['kind']:>7} {d['count']:3d} {d['flops'] / 1e6:8.2f} {d['alone_ms']:9.4f} "
              f"{d['gflops']:8.1f} {d['total_ms']:9.4f} {d['total_ms'] / r['dot_ms']:6.1%}")
    print(f"  {common_line(r)}")


def run(only: str | None = None, *, repeats: int = 7, steps: int = 20, calls: int = 20, dot_s: float = 0.05,
        hidden: int | None = None, layers: int | None = None, batch: int | None = None,
        peak_n: int = 2048, top: int = 12, trace: bool = False) -> dict:
    """Every workload's figures (`only`: one of WORKLOADS); `trace`: with each one's thunk times
    by category (`trace_thunks`) under `trace`."""
    peak = matmul_peak(n=peak_n)
    out = {"peak_gflops": peak, "args": {"repeats": repeats, "steps": steps, "calls": calls, "dot_s": dot_s,
                                         "hidden": hidden, "layers": layers, "batch": batch, "peak_n": peak_n,
                                         "trace": trace}}
    print(f"float32 matmul peak (jitted {peak_n}^3 jnp.dot, median): {peak:.0f} GFLOP/s")
    bandwidth = memory_bandwidth() if trace else None
    if trace:
        out["bandwidth_gbs"] = bandwidth
        print(f"memory bandwidth (a jitted 2-D elementwise pass, bytes read + written, median): {bandwidth:.1f} GB/s")
    cache = {}
    for name in [only] if only else WORKLOADS:
        if name == "eval_h128":
            ws = [eval_workload(b, calls, hidden, layers) for b in ([batch] if batch else EVAL_BATCHES)]
        else:
            ws = [train_workload(name[len("train_"):], steps, hidden, layers, batch)]
        for w in ws:
            out[w.name] = profile(w, repeats, peak, dot_s, cache)
            print_row(w.name, out[w.name], top)
            if trace:
                out[w.name]["trace"] = trace_thunks(w, top, bandwidth, peak)
                print_trace(out[w.name]["trace"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timings per figure (median)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per fused call")
    ap.add_argument("--calls", type=int, default=20, help="evaluation forwards per timing (mean)")
    ap.add_argument("--dot_s", type=float, default=0.05, help="seconds one timing of a dot alone aims at")
    ap.add_argument("--only", choices=WORKLOADS, default=None)
    ap.add_argument("--hidden", type=int, default=None, help="override every workload's hidden size")
    ap.add_argument("--layers", type=int, default=None, help="override every workload's layer count")
    ap.add_argument("--batch", type=int, default=None, help="one batch for every workload (default: 64 for "
                                                           "training, 8, 16, 32 and 64 rows for evaluation)")
    ap.add_argument("--peak_n", type=int, default=2048, help="matrix size of the matmul peak (toy runs: smaller)")
    ap.add_argument("--top", type=int, default=12, help="dot shapes shown per workload")
    ap.add_argument("--trace", action="store_true", help="also trace one call and time its thunks by category")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if min(args.repeats, args.steps, args.calls, args.top, args.peak_n) < 1 or not args.dot_s > 0:
        ap.error("--repeats, --steps, --calls, --top, --peak_n and --dot_s must be positive")
    if any(v is not None and v < 1 for v in (args.hidden, args.layers, args.batch)):
        ap.error("--hidden, --layers and --batch must be >= 1")
    out = run(args.only, repeats=args.repeats, steps=args.steps, calls=args.calls, dot_s=args.dot_s,
              hidden=args.hidden, layers=args.layers, batch=args.batch, peak_n=args.peak_n, top=args.top,
              trace=args.trace)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
