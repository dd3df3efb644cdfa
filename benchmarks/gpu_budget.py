"""Static SASS budget of the GPU kernels (issues #23 part 1, #28 part 1): `make gpu-budget`.

No GPU needed. Disassembles the built sm_90 code of fused_losses/_C_cuda*.so (cuobjdump and
nvdisasm from triton's wheel) and the Triton kernels compiled for sm_90 as the launcher
configures them, and for every hot kernel instantiation counts the warp-instructions the
steady-state loop issues per element, MUFU per element, the load/store widths, registers and
resident warps per SM, and the implied % of the H100 SXM HBM roofline. Prints a table, writes
benchmarks/results/gpu-static-sm90.json, and exits non-zero when a case exceeds its committed
ceiling (benchmarks/gpu_budget_limits.json) or loses its wide accesses.

    .venv/bin/python -m benchmarks.gpu_budget [--no-cuda|--no-triton] [--require-targets]
        [--update-limits] [--markdown] [--explain REGEX]

Method (csrc/cuda/NOTES.md, "Static SASS budget (make gpu-budget)"):
  1. SASS (nvdisasm -c -gi: with the -lineinfo inlining chain) -> basic blocks (labels, branches,
     EXIT/RET) -> dominators -> natural loops (back edges u -> h with h dominating u), nested by
     containment. Indirect branches and irreducible flow raise ModelMismatch.
  2. Off the counted path: blocks that call __assertfail (CALL.ABS), trap (BPT), call a libdevice
     slow path or the 64-bit division subroutine, and every block that can only reach them; the
     BRA.DIV fallback of a diverged warp; blocks all of whose instructions come from source text
     the work model's skip patterns match (the loss kinds, options and gamma branches the case
     does not run); the bodies of unrolled `if (c < C)` guards past C (unrolled_guards).
  3. One iteration of a loop costs the most expensive remaining path from its header to a back
     edge (an inner loop on the path: its trip count from the work model x its own iteration).
     The data branches left are the warp's common path (a warp runs a side when any lane does).
     Cost = SASS instructions, one warp-instruction each (predicated-off ones issue too).
  4. The WORK MODEL of each kernel (cuda_work / triton_work, keyed by the template name and its
     arguments, or the Triton kernel and its constexprs) says which loop is the steady state,
     which inner loops it must contain and how often they run, and how many elements a warp
     handles per iteration. A structure that does not match (another loop nest, an unexpected
     call, a missing instance...) raises ModelMismatch: exit 2, never a number for a kernel the
     tool does not understand.
  5. % of the H100 roofline from the instruction issue time vs the memory time of the case's
     bytes; a Little's-law latency estimate beside it (reported, not gated).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu-static-sm90.json"
LIMITS = ROOT / "benchmarks" / "gpu_budget_limits.json"

# H100 SXM (the issue's machine model)
SMS = 132
CLOCK_HZ = 1.98e9
ISSUE_PER_SM = 4          # warp-instructions per cycle per SM (4 schedulers, one issue each)
HBM_BYTES_PER_S = 3.35e12
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REG_ALLOC_UNIT = 8        # registers per thread are allocated in multiples of 8 (256 per warp)
LATENCY_S = 600e-9        # loaded DRAM round trip assumed by the latency estimate
ISSUE_RATE = ISSUE_PER_SM * SMS * CLOCK_HZ

TARGETS = {("cuda", "fp32"): 85.0, ("cuda", "bf16"): 75.0, ("cuda", "fp16"): 75.0,
           ("triton", "fp32"): 75.0, ("triton", "bf16"): 60.0, ("triton", "fp16"): 60.0}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class ModelMismatch(RuntimeError):
    """The SASS of a kernel no longer has the structure its work model describes."""


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
def tool_dir() -> Path:
    env = os.environ.get("FL_CUDA_BINUTILS")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        raise SystemExit("gpu_budget: triton is not installed (its wheel ships cuobjdump and nvdisasm)")
    return Path(spec.origin).parent / "backends" / "nvidia" / "bin"


def tool(name: str) -> str:
    path = tool_dir() / name
    if not path.exists():
        raise SystemExit(f"gpu_budget: {path} not found (set FL_CUDA_BINUTILS to a folder with {name})")
    return str(path)


def tool_version(name: str) -> str:
    try:
        out = subprocess.run([tool(name), "--version"], capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, SystemExit):
        return "unknown"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown"


# ---------------------------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*(?:/\*.*\*/)?\s*$")
_LABEL = re.compile(r"^(\.L_[\w$]+|[\w.$]+):\s*$")
_FUNC = re.compile(r"^\.text\.([\w$.]+):\s*$")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str          # "" or "@P0", "@!P1", "@UP0"...
    opcode: str        # full mnemonic with modifiers, e.g. "LDG.E.128"
    operands: str
    loc: tuple  # ((file, line), ...): the source lines of -lineinfo, innermost first (inlining chain)

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def text(self) -> str:
        return f"{self.pred + ' ' if self.pred else ''}{self.opcode} {self.operands}".strip()


@dataclasses.dataclass
class Function:
    name: str
    instrs: list[Instr]
    labels: dict[str, int]  # label -> index of the instruction it precedes


def parse_sass(text: str) -> dict[str, Function]:
    """Functions of an nvdisasm listing (-c, optionally -g), by mangled name."""
    funcs: dict[str, Function] = {}
    cur: Function | None = None
    loc: tuple = ()
    group: list = []
    in_group = False
    for raw in text.splitlines():
        m = _FUNC.match(raw)
        if m:
            cur = Function(m.group(1), [], {})
            funcs[cur.name] = cur
            loc, group, in_group = (), [], False
            continue
        if cur is None:
            continue
        if raw.lstrip().startswith(".section") or raw.lstrip().startswith(".text."):
            cur = None
            continue
        m = _LINE.match(raw)
        if m:
            if not in_group:
                group, in_group = [], True
            group.append((m.group(1), int(m.group(2))))
            if m.group(3):
                group.append((m.group(3), int(m.group(4))))
            continue
        if in_group:
            loc, in_group = tuple(dict.fromkeys(group)), False
        m = _LABEL.match(raw.strip())
        if m and not raw.lstrip().startswith("/*"):
            cur.labels[m.group(1)] = len(cur.instrs)
            # nvdisasm prints a line only where it changes: past a label (a join of paths) the
            # inherited line may belong to one of the joined paths, so it is dropped.
            loc = ()
            continue
        m = _INSTR.match(raw)
        if m:
            body = m.group(2).strip()
            # VLIW pairs "{ A ; B }" do not occur on sm_90 listings; fail if they do.
            if body.startswith("{"):
                raise ModelMismatch(f"{cur.name}: paired instruction syntax not supported: {raw.strip()}")
            pred = ""
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            parts = body.split(None, 1)
            cur.instrs.append(Instr(int(m.group(1), 16), pred, parts[0], parts[1] if len(parts) > 1 else "", loc))
    return funcs


# ---------------------------------------------------------------------------------------------
# Control flow
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Block:
    id: int
    start: int
    end: int  # exclusive instruction index
    succs: list[int] = dataclasses.field(default_factory=list)
    preds: list[int] = dataclasses.field(default_factory=list)
    error: bool = False  # assert/trap/slow path
    rare_target: int | None = None  # successor taken only when the warp diverged (BRA.DIV)
    off_path: bool = False  # code of a variant the case does not run (the model's skip patterns)


# Calls off the counted path: libdevice slow paths (IEEE div/rcp/sqrt of denormal or huge
# operands), asserts, and the 64-bit integer division subroutines the compiler calls only when an
# operand does not fit 32 bits (it tests first and divides in 32 bits otherwise: tensors below
# 2^32 elements take that fast path, which is counted).
_ERROR_CALL = re.compile(r"slowpath|assertfail|__assert|__cuda_sm\d+_(?:div|rem)_[su]64", re.I)


class CFG:
    def __init__(self, fn: Function):
        self.fn = fn
        ins = fn.instrs
        if not ins:
            raise ModelMismatch(f"{fn.name}: no instructions")
        leaders = {0} | set(fn.labels.values())
        for i, it in enumerate(ins):
            if it.op in ("BRA", "EXIT", "RET", "BRX", "JMX", "JMP", "BPT", "KILL") and i + 1 < len(ins):
                leaders.add(i + 1)
        leaders = sorted(x for x in leaders if x < len(ins))
        self.blocks: list[Block] = []
        self.block_at: dict[int, int] = {}
        for k, s in enumerate(leaders):
            e = leaders[k + 1] if k + 1 < len(leaders) else len(ins)
            self.blocks.append(Block(k, s, e))
            self.block_at[s] = k
        for b in self.blocks:
            last = ins[b.end - 1]
            falls = True
            if last.op in ("BRX", "JMX", "JMP"):
                raise ModelMismatch(f"{fn.name}: indirect branch at {last.addr:#x} ({last.text}): not modelled")
            if last.op == "BRA":
                targets = _TARGET.findall(last.operands)
                if len(targets) != 1 or targets[0] not in fn.labels:
                    raise ModelMismatch(f"{fn.name}: branch without a known target at {last.addr:#x}: {last.text}")
                b.succs.append(self.block_at[fn.labels[targets[0]]])
                # "@P0 BRA", "BRA P1, target", "BRA.DIV UR4, target" (taken when the warp has
                # diverged: a fallback path, treated as an error path) are conditional.
                conditional = bool(last.pred) or not last.operands.strip().startswith("`")
                falls = conditional and not last.pred == "@PT"
                if last.opcode.startswith("BRA.DIV"):
                    b.rare_target = b.succs[-1]
            elif last.op in ("EXIT", "RET", "BPT", "KILL"):
                falls = bool(last.pred) and last.pred != "@PT"
            if falls and b.end < len(ins):
                b.succs.append(self.block_at[b.end])
            b.succs = list(dict.fromkeys(b.succs))
            for it in ins[b.start:b.end]:
                if it.op == "BPT" or (it.op == "CALL" and (it.opcode.startswith("CALL.ABS") or _ERROR_CALL.search(it.operands))):
                    b.error = True
        for b in self.blocks:
            for s in b.succs:
                self.blocks[s].preds.append(b.id)
        self.disabled: set = set()  # (block, successor) edges the work model rules out
        self._mark_error_only()
        self.dom = self._dominators()
        self.loops = self._loops()

    def usable(self, b: int) -> bool:
        return not self.blocks[b].error and not self.blocks[b].off_path

    def instrs(self, b: int) -> list[Instr]:
        blk = self.blocks[b]
        return self.fn.instrs[blk.start:blk.end]

    def _mark_error_only(self):
        """Blocks every path of which reaches an error block (or that reach no exit at all,
        e.g. the BRA-to-self after a trap) are error blocks too."""
        n = len(self.blocks)
        good = [False] * n  # can reach a normal exit (EXIT/RET) avoiding error blocks
        changed = True
        for b in self.blocks:
            last = self.fn.instrs[b.end - 1]
            if not b.error and last.op in ("EXIT", "RET"):
                good[b.id] = True
        while changed:
            changed = False
            for b in self.blocks:
                if not good[b.id] and not b.error and any(good[s] for s in b.succs):
                    good[b.id] = True
                    changed = True
        for b in self.blocks:
            if not good[b.id]:
                b.error = True

    def _dominators(self) -> list[set]:
        n = len(self.blocks)
        order = self._rpo()
        dom = [set(range(n)) for _ in range(n)]
        dom[0] = {0}
        changed = True
        while changed:
            changed = False
            for b in order[1:]:
                preds = [p for p in self.blocks[b].preds if p in self._reach]
                new = set.intersection(*(dom[p] for p in preds)) if preds else set()
                new = new | {b}
                if new != dom[b]:
                    dom[b] = new
                    changed = True
        return dom

    def _rpo(self) -> list[int]:
        seen, post = set(), []
        stack = [(0, iter(self.blocks[0].succs))]
        seen.add(0)
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                post.append(node)
                stack.pop()
            elif nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, iter(self.blocks[nxt].succs)))
        self._reach = seen
        return post[::-1]

    def _loops(self) -> list["Loop"]:
        by_header: dict[int, set] = {}
        latches: dict[int, list] = defaultdict(list)
        for b in self.blocks:
            if b.id not in self._reach:
                continue
            for s in b.succs:
                if s in self.dom[b.id]:  # back edge b -> s
                    body = {s, b.id}
                    work = [b.id] if b.id != s else []
                    while work:
                        x = work.pop()
                        for p in self.blocks[x].preds:
                            if p not in body and p in self._reach:
                                body.add(p)
                                work.append(p)
                    by_header.setdefault(s, set()).update(body)
                    latches[s].append(b.id)
        loops = [Loop(h, frozenset(body), tuple(latches[h])) for h, body in by_header.items()]
        for lp in loops:
            inner = [o for o in loops if o is not lp and o.body < lp.body]
            lp.children = [o for o in inner if not any(o.body < x.body for x in inner if x is not o)]
        for lp in loops:
            lp.error = all(self.blocks[x].error for x in lp.body)
        return sorted(loops, key=lambda lp: self.blocks[lp.header].start)

    def top_loops(self) -> list["Loop"]:
        """Outermost loops, without loops made only of error blocks (e.g. the spin after a trap)."""
        return [lp for lp in self.loops if not lp.error and not any(lp.body < o.body for o in self.loops)]


@dataclasses.dataclass(eq=False)
class Loop:
    header: int
    body: frozenset
    latches: tuple
    children: list = dataclasses.field(default_factory=list)
    error: bool = False

    def live_children(self) -> list["Loop"]:
        return [c for c in self.children if not c.error]


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
def _ld_st_bits(it: Instr) -> int | None:
    mods = it.opcode.split(".")[1:]
    for m in mods:
        if m in ("128", "64", "256"):
            return int(m)
        if m in ("U16", "S16"):
            return 16
        if m in ("U8", "S8"):
            return 8
    return 32


@dataclasses.dataclass
class Count:
    """Instruction statistics of a weighted set of instructions."""
    total: float = 0.0
    mufu: float = 0.0
    ld: Counter = dataclasses.field(default_factory=Counter)   # width (bits) -> count of global loads
    st: Counter = dataclasses.field(default_factory=Counter)
    ops: Counter = dataclasses.field(default_factory=Counter)

    def add(self, other: "Count", k: float = 1.0) -> "Count":
        out = Count(self.total + k * other.total, self.mufu + k * other.mufu, Counter(self.ld), Counter(self.st),
                    Counter(self.ops))
        for w, n in other.ld.items():
            out.ld[w] += k * n
        for w, n in other.st.items():
            out.st[w] += k * n
        for o, n in other.ops.items():
            out.ops[o] += k * n
        return out

    @staticmethod
    def of(instrs) -> "Count":
        c = Count()
        for it in instrs:
            c.total += 1
            c.ops[it.op] += 1
            if it.op == "MUFU":
                c.mufu += 1
            elif it.op == "LDG":
                c.ld[_ld_st_bits(it)] += 1
            elif it.op == "STG":
                c.st[_ld_st_bits(it)] += 1
        return c


def dominant_bits(widths: Counter) -> int:
    """The access width that moves most of the bits (0 when there are no accesses)."""
    if not widths:
        return 0
    return max(widths, key=lambda w: (widths[w] * w, w))


class Counter_:
    """Cost of one iteration of a loop along its most expensive non-error path."""

    def __init__(self, cfg: CFG, trips: Callable[[Loop, int], float]):
        self.cfg = cfg
        self.trips = trips  # (inner loop, its index among the live children) -> executions per outer iteration
        self.paths: dict = {}  # loop header -> the counted path: ("B", block) / ("L", inner loop, trips)

    def path_weights(self, loop: Loop, mult: float = 1.0, out: Counter | None = None) -> Counter:
        """block -> executions per iteration of `loop` along the counted path (after iteration())."""
        out = Counter() if out is None else out
        for item in self.paths[loop.header]:
            if item[0] == "B":
                out[item[1]] += mult
            else:
                self.path_weights(item[1], mult * item[2], out)
        return out

    def iteration(self, loop: Loop) -> Count:
        cfg = self.cfg
        children = loop.live_children()
        child_of = {}
        for k, ch in enumerate(children):
            for b in ch.body:
                child_of[b] = k
        child_cost = [self.iteration(ch) for ch in children]
        # DAG over the loop's blocks minus back edges to the header; inner loops collapse to
        # one node (entered at their header, left by any exit edge).
        latches = set(loop.latches)

        def node(b):
            return ("L", child_of[b]) if b in child_of else ("B", b)

        def cost(n):
            if n[0] == "B":
                ins = cfg.instrs(n[1])
                call = next((it for it in ins if it.op == "CALL"), None)
                if call is not None:  # error calls (assert, slow paths) are in error blocks, never here
                    raise ModelMismatch(f"{cfg.fn.name}: a subroutine call on the counted path at {call.addr:#x} "
                                        f"({call.text}): its body is not counted; not modelled")
                return Count.of(ins)
            k = n[1]
            ch = children[k]
            t = self.trips(ch, k)
            # t iterations of the body, plus the header's exit test once more (approximated by
            # nothing: the loop test is part of each iteration's count)
            return Count().add(child_cost[k], t)

        def succs(n):
            if n[0] == "B":
                b = n[1]
                out = []
                for s in cfg.blocks[b].succs:
                    if s == loop.header or s not in loop.body or not cfg.usable(s) or s == cfg.blocks[b].rare_target \
                            or (b, s) in cfg.disabled:
                        continue
                    out.append(node(s))
                return out
            ch = children[n[1]]
            out = []
            for b in ch.body:
                for s in cfg.blocks[b].succs:
                    if s not in ch.body and s in loop.body and s != loop.header and cfg.usable(s) \
                            and s != cfg.blocks[b].rare_target and (b, s) not in cfg.disabled:
                        out.append(node(s))
            return list(dict.fromkeys(out))

        def is_end(n):
            if n[0] == "B":
                return n[1] in latches
            return any(b in latches for b in children[n[1]].body)

        visiting = set()

        @functools.lru_cache(maxsize=None)
        def best(n):
            if n in visiting:
                raise ModelMismatch(f"{cfg.fn.name}: a cycle in a loop body that is not a natural loop (irreducible flow)")
            visiting.add(n)
            try:
                return _best(n)
            finally:
                visiting.discard(n)

        choice = {}

        def _best(n):
            c = cost(n)
            options = [(best(s), s) for s in succs(n)]
            options = [o for o in options if o[0] is not None]
            if is_end(n):
                options.append((Count(), None))
            if not options:
                return None
            tail, nxt = max(options, key=lambda o: o[0].total)
            choice[n] = nxt
            return c.add(tail)

        start = node(loop.header)
        res = best(start)
        path, n = [], start
        while n is not None:
            path.append(("B", n[1]) if n[0] == "B" else ("L", children[n[1]], self.trips(children[n[1]], n[1])))
            n = choice.get(n)
        self.paths[loop.header] = path
        if res is None:
            raise ModelMismatch(f"{cfg.fn.name}: no non-error path through the loop at {cfg.fn.instrs[cfg.blocks[loop.header].start].addr:#x}")
        return res


# ---------------------------------------------------------------------------------------------
# Source text (for the models' skip patterns: what a case does not run, by source TEXT, never by
# line number) and lineinfo attribution
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _source_lines(path: str) -> list[str]:
    candidates = [Path(path)]
    # The lineinfo holds the build's absolute paths (another checkout, CI's tree): map the
    # part from csrc/ on onto this tree.
    if "/csrc/" in path:
        candidates.insert(0, ROOT / ("csrc/" + path.split("/csrc/", 1)[1]))
    for c in candidates:
        if c.exists():
            return c.read_text(errors="replace").splitlines()
    return []


def source_text(loc: tuple) -> list[str]:
    out = []
    for f, n in loc:
        lines = _source_lines(f)
        if 0 < n <= len(lines):
            out.append(lines[n - 1])
    return out


_CONTROL = {"BRA", "BSSY", "BSYNC", "NOP", "WARPSYNC", "EXIT", "RET"}


def mark_off_path(cfg: CFG, skip: list[str]) -> int:
    """Blocks all of whose instructions come from source lines matching a skip pattern (code
    of a loss variant, an output or an option the case does not use): off the counted path.
    Returns the number of blocks marked."""
    if not skip:
        return 0
    rx = re.compile("|".join(f"(?:{p})" for p in skip))
    marked = 0
    cfg.skip_hits = Counter()
    for b in cfg.blocks:
        ins = [it for it in cfg.instrs(b.id) if it.op not in _CONTROL]
        if not ins:
            continue
        hits = sum(1 for it in ins if any(rx.search(t) for t in source_text(it.loc)))
        if hits == len(ins):
            b.off_path = True
            marked += 1
            for p in skip:
                if any(re.search(p, t) for it in ins for t in source_text(it.loc)):
                    cfg.skip_hits[p] += 1
    return marked


def _reaches(cfg: CFG, loop: Loop, src: int, dst: int) -> bool:
    seen, todo = {src}, [src]
    while todo:
        x = todo.pop()
        if x == dst:
            return True
        for y in cfg.blocks[x].succs:
            if y in loop.body and y != loop.header and y not in seen:
                seen.add(y)
                todo.append(y)
    return False


def apply_unrolled_guards(cfg: CFG, loop: Loop, pattern: str, runs: int, count: int) -> None:
    rx = re.compile(pattern)
    by_line: dict = defaultdict(list)
    for b in sorted(loop.body, key=lambda x: cfg.blocks[x].start):
        last = cfg.fn.instrs[cfg.blocks[b].end - 1]
        if last.op != "BRA" or not last.loc or len(cfg.blocks[b].succs) != 2:
            continue
        text = source_text(last.loc[:1])
        if text and rx.search(text[0]):
            by_line[last.loc[0]].append(b)
    if not by_line:
        raise ModelMismatch(f"{cfg.fn.name}: no unrolled guard `{pattern}` in the steady-state loop")
    for line, blocks in by_line.items():
        if len(blocks) != count:
            raise ModelMismatch(f"{cfg.fn.name}: {len(blocks)} guards `{pattern}` at {Path(line[0]).name}:{line[1]}, "
                                f"the model expects {count} (one per unrolled slot)")
        for k, b in enumerate(blocks):
            x, y = cfg.blocks[b].succs
            if _reaches(cfg, loop, x, y) == _reaches(cfg, loop, y, x):
                raise ModelMismatch(f"{cfg.fn.name}: guard at {cfg.fn.instrs[cfg.blocks[b].end - 1].addr:#x} is not "
                                    f"an if without else")
            body = x if _reaches(cfg, loop, x, y) else y
            if k >= runs:
                cfg.disabled.add((b, body))


# ---------------------------------------------------------------------------------------------
# Work models of the CUDA kernels (csrc/cuda/softmax_kernels.cu, sigmoid.cu)
# ---------------------------------------------------------------------------------------------
_DEMANGLE_ARGS = re.compile(r"^void fused_losses::cuda::(\w+)<(.*)>\(.*\)$")


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def split_template_args(args: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in args:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


# the kernels' element types (csrc/cuda/kernels/device.cuh: fl_bf16 / fl_half under nvcc)
_CTYPE = {"float": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16"}

# Source text of code the hot cases never run (the loss is focal with gamma = 2, a reduced
# loss with the gradient, no per-row weight, no OHEM mask, no label smoothing): the other loss
# kinds of the runtime switch, the per-row outputs of 'none' and Stats, the gamma branches of
# pow_gamma other than gamma = 2.
SOFTMAX_FOCAL_SKIP = [
    r"a\.kept\b", r"\bib_row\b|\bib\.|a\.feature_norm|a\.class_weight|grad_feature", r"ghm_bin|bin_weights",
    r"loss_rows\[|log_pt_rows\[|one_minus_pt_rows\[", r"q \* q \* q|sqrt_\(q\)|pow_\(q, gamma\)|powf\(",
]
SIGMOID_FOCAL_SKIP = [
    r"ghm_bin|bin_weights|ghm_sigmoid_g|sigmoid_parts\(x, y, e\)", r"loss_elems",
    r"q \* q \* q|sqrt_\(q\)|pow_\(q, gamma\)|powf\(",
]


# The source text of the pack kernels' next-row label load (a pack that crosses a row end).
_SIGMOID_ROW_CROSSING = {
    "sigmoid_kernel": r"label = row_label\(a, \+\+r, row_valid\)",
    "sigmoid_focal_kernel": r"\blab1\b|first_row",
}


@dataclasses.dataclass
class Work:
    """What one iteration of the steady-state loop does: its elements per warp, the trip count
    of each inner loop, and which variant's code is off the path."""
    steady: Callable[[CFG], Loop]
    elems_per_warp_iter: float
    inner_trips: list[float]
    skip: list[str]
    note: str
    tile_trips: float | None = None  # Triton: every inner loop is a column-tile loop with this trip count
    # Unrolled guards: (pattern, runs, count): the conditional branches of each source line whose
    # text matches the pattern (an unrolled `if (c < C)`) must number `count` per line; in address
    # order the first `runs` bodies run, the others are skipped (the edge into the body is cut).
    unrolled_guards: list = dataclasses.field(default_factory=list)


def _single_top_loop(cfg: CFG) -> Loop:
    tops = [lp for lp in cfg.top_loops() if not lp.error]
    # the block_sum at the end has no loop; a reduction loop would be a second top-level loop
    if len(tops) != 1:
        raise ModelMismatch(f"{cfg.fn.name}: expected one top-level (grid-stride) loop, found {len(tops)}")
    return tops[0]


def _loop_with_loads(cfg: CFG, n_inner: int | None) -> Callable[[CFG], Loop]:
    def pick(cfg: CFG) -> Loop:
        lp = _single_top_loop(cfg)
        kids = lp.live_children()
        if n_inner is not None and len(kids) != n_inner:
            raise ModelMismatch(f"{cfg.fn.name}: the grid-stride loop has {len(kids)} inner loops, the model "
                                f"expects {n_inner}")
        if not any(it.op == "LDG" for b in lp.body for it in cfg.instrs(b)):
            raise ModelMismatch(f"{cfg.fn.name}: the steady-state loop has no global load")
        return lp
    return pick


def cuda_work(template: str, args: list[str], C: int) -> Work:
    """The work model of a kernel instance (template name + arguments) for a row length C."""
    if template == "softmax_rows_kernel":
        vec, g, items = int(args[2]), int(args[3]), int(args[4])
        if C > g * items * vec:
            raise ModelMismatch(f"softmax_rows_kernel<{vec}, {g}, {items}> holds {g * items * vec} values, C = {C}")
        return Work(_loop_with_loads(None, 0), (32 // g) * C, [], SOFTMAX_FOCAL_SKIP,
                    f"grid-stride loop: {32 // g} row(s) of C per warp per iteration (G = {g} lanes per row, "
                    f"ITEMS = {items} packs of VEC = {vec}), no inner loop")
    if template == "softmax_rows_large_kernel":
        vec = int(args[2])
        trips = math.ceil(C / (32 * vec))
        return Work(_loop_with_loads(None, 3), C, [trips] * 3, SOFTMAX_FOCAL_SKIP,
                    f"grid-stride loop over rows, a warp per row; its 3 inner sweeps (max; sums; gradient) "
                    f"run ceil(C / (32 x VEC = {vec})) = {trips} times each")
    if template == "softmax_spatial_kernel":
        regs = int(args[2])
        if regs == 0:
            raise ModelMismatch("softmax_spatial_kernel<..., 0, ...> (the sweep variant) has no work model yet")
        if C > regs:
            raise ModelMismatch(f"softmax_spatial_kernel<kRegs = {regs}> with C = {C}")
        return Work(_loop_with_loads(None, 0), 32 * C, [], SOFTMAX_FOCAL_SKIP,
                    f"grid-stride loop, a thread per (n, s) row: 32 rows of C per warp per iteration; the "
                    f"kRegs = {regs} unrolled class slots: the bodies of `if (c < C)` run for the first C "
                    f"(each unrolled loop must have {regs} such guards)",
                    unrolled_guards=[(r"if \(c < C\)", C, regs)])
    if template in _SIGMOID_ROW_CROSSING:
        # both pack kernels: a thread per 16-byte pack, then a scalar tail loop
        scalar = _CTYPE[args[0]]
        vec = 16 // DTYPE_BYTES[scalar]
        skip = list(SIGMOID_FOCAL_SKIP)
        if args[3] == "true" and C % vec == 0:
            # packs start at multiples of VEC, so no pack crosses a row end: the label load
            # for the next row inside a pack never runs
            skip.append(_SIGMOID_ROW_CROSSING[template])
        return Work(_pick_sigmoid, 32 * vec, [], skip,
                    f"grid-stride loop over packs: 32 packs of VEC = {vec} elements per warp per iteration "
                    f"(the scalar tail loop is not the steady state)")
    raise ModelMismatch(f"no work model for kernel template {template}")


def _pick_sigmoid(cfg: CFG) -> Loop:
    tops = [lp for lp in cfg.top_loops() if not lp.error]
    # two grid-stride loops: packs (128-bit loads), then the scalar tail
    if len(tops) != 2:
        raise ModelMismatch(f"{cfg.fn.name}: expected 2 top-level loops (packs, tail), found {len(tops)}")
    wide = [lp for lp in tops if any(it.opcode.startswith("LDG") and _ld_st_bits(it) == 128
                                     for b in lp.body for it in cfg.instrs(b))]
    if len(wide) != 1:
        raise ModelMismatch(f"{cfg.fn.name}: expected exactly one loop with 128-bit loads, found {len(wide)}")
    if wide[0].live_children():
        raise ModelMismatch(f"{cfg.fn.name}: the packs loop has inner loops")
    return wide[0]


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    backend: str
    kernel: str        # "softmax rows", ...
    loss: str
    dtype: str
    C: int
    grad_dtype: str
    target_bytes_per_elem: float
    note: str = ""


def cuda_instance(case: Case) -> tuple[str, list[str]]:
    """The kernel template and arguments softmax_pass / launch_sigmoid pick for a case (a
    reduced loss: grad_t = bf16 for bf16 logits, float otherwise; aligned contiguous tensors)."""
    ct = {v: k for k, v in _CTYPE.items()}
    x, gt = ct[case.dtype], ct[case.grad_dtype]
    vec = 16 // DTYPE_BYTES[case.dtype]
    if case.kernel == "softmax rows":
        packed = case.C % vec == 0
        v = vec if packed else 1
        packs = -(-case.C // v)
        long_items = 1280 // (32 * v)  # pick_rows_kernel (csrc/cuda/kernels/softmax_kernels.cuh)
        if v == 8 and 8 < packs <= 10:  # 16-bit C = 72, 80: packs of 4, 4 lanes x 5
            return "softmax_rows_kernel", [x, gt, "4", "4", "5"]
        for lim, g, items in ((4, 4, 1), (12, 4, 3), (24, 8, 3), (48, 16, 3), (128, 32, 4),
                              (32 * long_items, 32, long_items)):
            if packs <= lim:
                return "softmax_rows_kernel", [x, gt, str(v), str(g), str(items)]
        return "softmax_rows_large_kernel", [x, gt, str(v), "false"]
    if case.kernel == "softmax spatial":
        return "softmax_spatial_kernel", [x, gt, "32" if case.C <= 32 else "0", "false"]
    # plain sigmoid focal (no weight, no per-class alpha, numel < 2^31, C >= VEC with labels),
    # gamma 2 compiled in: launch_sigmoid's sigmoid_focal_kernel<.., kLabels, kGamma = 2>
    if case.kernel == "sigmoid labels":
        return "sigmoid_focal_kernel", [x, "float", gt, "true", "2"]
    if case.kernel == "sigmoid float target":
        return "sigmoid_focal_kernel", [x, x, gt, "false", "2"]
    raise ValueError(case.kernel)


def grad_dtype(dtype: str) -> str:
    return "bf16" if dtype == "bf16" else "fp32"  # saved_grad_dtype of a reduced loss


def cuda_cases() -> list[Case]:
    out = []
    for dt in ("fp32", "bf16", "fp16"):
        gd = grad_dtype(dt)
        out.append(Case("cuda", "softmax rows", "softmax_focal", dt, 80, gd, 8 / 80))
        out.append(Case("cuda", "softmax rows", "softmax_focal", dt, 1203, gd, 8 / 1203))
        out.append(Case("cuda", "softmax spatial", "softmax_focal", dt, 19, gd, 8 / 19))
        out.append(Case("cuda", "sigmoid labels", "sigmoid_focal", dt, 80, gd, 8 / 80))
        out.append(Case("cuda", "sigmoid float target", "sigmoid_focal", dt, 80, gd, DTYPE_BYTES[dt]))
    return out


def case_key(row: dict) -> str:
    return f"{row['backend']}/{row['kernel']}/{row['dtype']}/C={row['C']}"


# ---------------------------------------------------------------------------------------------
# Resources, roofline
# ---------------------------------------------------------------------------------------------
def warps_per_sm(regs: int, smem: int, threads: int) -> int:
    wpb = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) // REG_ALLOC_UNIT) * REG_ALLOC_UNIT * 32
    by_regs = (REGS_PER_SM // regs_per_warp) // wpb
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK) if smem else MAX_BLOCKS_PER_SM
    by_warps = MAX_WARPS_PER_SM // wpb
    return min(by_regs, by_smem, by_warps, MAX_BLOCKS_PER_SM) * wpb


def roofline(case: Case, inst_per_elem: float, warps: int, load_bytes_per_warp_iter: float) -> dict:
    bytes_per_elem = DTYPE_BYTES[case.dtype] + DTYPE_BYTES[case.grad_dtype] + case.target_bytes_per_elem
    t_mem = bytes_per_elem / HBM_BYTES_PER_S
    t_issue = inst_per_elem / ISSUE_RATE
    pct = min(1.0, t_mem / t_issue) * 100 if t_issue > 0 else 100.0
    # Latency (Little's law): the loads of one steady-state iteration (one inner trip for the
    # sweep kernels) in flight per warp, `warps` warps per SM, against the bytes an SM must
    # have in flight to stream at its share of the HBM bandwidth over LATENCY_S.
    need = HBM_BYTES_PER_S / SMS * LATENCY_S
    lat = min(1.0, warps * load_bytes_per_warp_iter / need) * 100
    return {"bytes_per_elem": round(bytes_per_elem, 4), "pct_roofline": round(pct, 1),
            "pct_latency_bound": round(lat, 1), "pct_roofline_with_latency": round(min(pct, lat), 1)}


def res_usage(cubin_or_so: str) -> dict[str, dict]:
    out = subprocess.run([tool("cuobjdump"), "-res-usage", cubin_or_so], capture_output=True, text=True,
                         check=True).stdout
    res, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function ([\w$.]+):", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and cur:
            res[cur] = {"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": int(m.group(3)),
                        "local": int(m.group(4))}
            cur = None
    return res


# ---------------------------------------------------------------------------------------------
# Analysis of one kernel
# ---------------------------------------------------------------------------------------------
def analyse(fn: Function, work: Work, case: Case, res: dict, threads: int) -> dict:
    cfg = CFG(fn)
    marked = mark_off_path(cfg, work.skip)
    loop = work.steady(cfg)
    for pattern, runs, count in work.unrolled_guards:
        apply_unrolled_guards(cfg, loop, pattern, runs, count)
    kids = loop.live_children()
    if work.inner_trips is None:
        trips = [work.tile_trips] * len(kids)
    else:
        trips = work.inner_trips
    if len(kids) != len(trips):
        raise ModelMismatch(f"{fn.name}: {len(kids)} inner loops in the steady-state loop, the model has "
                            f"{len(trips)}")
    for ch in kids:
        if ch.live_children():
            raise ModelMismatch(f"{fn.name}: a loop nest deeper than the model's (an inner loop has inner loops)")
    counter = Counter_(cfg, lambda ch, k: trips[k])
    per_iter = counter.iteration(loop)
    e = work.elems_per_warp_iter
    warps = warps_per_sm(res["regs"], res["smem"], threads)
    # bytes one warp has in flight: the loads of one trip of the innermost loop that loads
    if kids:
        inner = [Counter_(cfg, lambda ch, k: 0.0).iteration(ch) for ch in kids]
        lb = max(sum(w / 8 * n for w, n in c.ld.items()) for c in inner) * 32
    else:
        lb = sum(w / 8 * n for w, n in per_iter.ld.items()) * 32
    row = {
        "backend": case.backend, "kernel": case.kernel, "loss": case.loss, "dtype": case.dtype, "C": case.C,
        "grad_dtype": case.grad_dtype, "instance": fn.name,
        "warp_inst_per_elem": round(per_iter.total / e, 3), "mufu_per_elem": round(per_iter.mufu / e, 3),
        "ld_bits": dominant_bits(per_iter.ld), "st_bits": dominant_bits(per_iter.st),
        "ld_widths": {str(k): round(v, 2) for k, v in sorted(per_iter.ld.items())},
        "st_widths": {str(k): round(v, 2) for k, v in sorted(per_iter.st.items())},
        "regs": res["regs"], "smem_bytes": res["smem"], "spill_bytes": res["local"], "threads": threads,
        "warps_per_sm": warps, "warp_inst_per_iter": per_iter.total, "elems_per_warp_iter": e,
        "work_model": work.note, "off_path_blocks": marked,
        # skip patterns that set no block aside (renamed code? the count is then an upper bound)
        "unused_skip_patterns": [p for p in work.skip if not getattr(cfg, "skip_hits", {}).get(p)],
    }
    row.update(roofline(case, row["warp_inst_per_elem"], warps, lb))
    row["target_pct"] = TARGETS[(case.backend, case.dtype)]
    row["meets_target"] = row["pct_roofline"] >= row["target_pct"]
    row["top_lines"] = top_lines(cfg, counter.path_weights(loop), e)
    if EXPLAIN and re.search(EXPLAIN, case_key(row)):
        print(f"== {case_key(row)}: {row['instance']}: warp-instructions per element by source line on the "
              f"counted path ({per_iter.total:.0f} per iteration of {e:g} elements)")
        for line in top_lines(cfg, counter.path_weights(loop), e, n=10 ** 6):
            print("   ", line)
    return row


EXPLAIN: str | None = None  # --explain REGEX: print the per-line breakdown of the matching cases


def top_lines(cfg: CFG, weights: Counter, elems: float, n: int = 6) -> list[str]:
    """Human-readable: the outermost source lines (the kernel's own, inlining resolved) with the
    most warp-instructions per element on the counted path (from -lineinfo; informative only,
    not used by the model)."""
    cnt: Counter = Counter()
    for b, w in weights.items():
        for it in cfg.instrs(b):
            key = "?"
            if it.loc:
                f, ln = it.loc[-1]
                text = source_text(((f, ln),))
                key = f"{Path(f).name}:{ln} {text[0].strip()[:60] if text else ''}"
            cnt[key] += w
    return [f"{v / elems:.3f} {k}" for k, v in cnt.most_common(n)]


# ---------------------------------------------------------------------------------------------
# CUDA: the built extension
# ---------------------------------------------------------------------------------------------
def cuda_so() -> Path | None:
    found = sorted(glob.glob(str(ROOT / "fused_losses" / "_C_cuda*.so")))
    return Path(found[0]) if found else None


def disassemble(cubin: str) -> str:
    return subprocess.run([tool("nvdisasm"), "-c", "-gi", cubin], capture_output=True, text=True, check=True).stdout


def load_cuda_functions(so: Path, workdir: Path, units: tuple | None = None
                        ) -> tuple[dict[str, Function], dict[str, dict]]:
    """Functions and resource usage of the sm_90 cubins of the extension (units: only the
    translation units of these names; None: every one, so that moved kernels are still found)."""
    listing = subprocess.run([tool("cuobjdump"), "-lelf", str(so)], capture_output=True, text=True, check=True).stdout
    names = re.findall(r"ELF file\s+\d+:\s+(\S+)", listing)
    if not any("sm_90" in n for n in names):
        raise SystemExit(f"gpu_budget: {so} has no sm_90 code (built with TORCH_CUDA_ARCH_LIST=9.0?): {names}")
    subprocess.run([tool("cuobjdump"), "-xelf", "all", str(so)], cwd=workdir, capture_output=True, check=True)
    funcs, res = {}, {}
    for name in names:
        if "sm_90" not in name or (units is not None and not any(name.startswith(k + ".") for k in units)):
            continue
        path = workdir / name
        funcs.update(parse_sass(disassemble(str(path))))
        res.update(res_usage(str(path)))
    return funcs, res


def run_cuda(workdir: Path) -> list[dict]:
    so = cuda_so()
    if so is None:
        raise SystemExit("gpu_budget: fused_losses/_C_cuda*.so not found: build the CUDA part first (make build)")
    funcs, res = load_cuda_functions(so, workdir)
    dem = demangle(list(funcs))
    by_instance = {}
    for mangled, d in dem.items():
        m = _DEMANGLE_ARGS.match(d)
        if m:
            by_instance[(m.group(1), tuple(split_template_args(m.group(2))))] = mangled
    rows = []
    for case in cuda_cases():
        template, args = cuda_instance(case)
        mangled = by_instance.get((template, tuple(args)))
        if mangled is None:
            raise ModelMismatch(f"{case.kernel} {case.dtype} C={case.C}: kernel {template}<{', '.join(args)}> not "
                                f"found in {so.name} (the launcher's choice changed? update cuda_instance)")
        work = cuda_work(template, args, case.C)
        row = analyse(funcs[mangled], work, case, res[mangled], 256)
        row["instance"] = f"{template}<{', '.join(args)}>"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Report, limits, gate
# ---------------------------------------------------------------------------------------------
MARGIN = 0.03  # a ceiling is today's count + 3% (rounded up to 0.01)

METHOD = ("static SASS count (benchmarks/gpu_budget.py): basic blocks, natural loops, the most expensive "
          "non-error path of one steady-state iteration with the work model's off-path code removed; "
          "inner loops x model trip counts; / elements per warp-iteration")
MACHINE_MODEL = (f"H100 SXM: {ISSUE_PER_SM} warp-inst/cycle/SM x {SMS} SMs x {CLOCK_HZ / 1e9:.2f} GHz, "
                 f"{HBM_BYTES_PER_S / 1e12:.2f} TB/s; pct_roofline = min(1, t_mem / t_issue); latency bound: "
                 f"warps/SM x bytes loaded per warp-iteration vs {LATENCY_S * 1e9:.0f} ns x HBM bandwidth per SM")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        # the results file this run rewrites does not make the tree dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){RESULTS.relative_to(ROOT)}"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict]) -> None:
    head = (f"{'backend':7s} {'kernel':22s} {'dtype':5s} {'C':>5s} {'inst/el':>7s} {'mufu/el':>7s} {'ld':>4s} "
            f"{'st':>4s} {'regs':>4s} {'warps':>5s} {'%roof':>6s} {'%+lat':>6s} {'target':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:7s} {r['kernel']:22s} {r['dtype']:5s} {r['C']:5d} {r['warp_inst_per_elem']:7.3f} "
              f"{r['mufu_per_elem']:7.3f} {r['ld_bits']:4d} {r['st_bits']:4d} {r['regs']:4d} {r['warps_per_sm']:5d} "
              f"{r['pct_roofline']:6.1f} {r['pct_roofline_with_latency']:6.1f} "
              f"{('ok' if r['meets_target'] else 'MISS') + ' ' + str(int(r['target_pct'])):>6s}")


def markdown_table(rows: list[dict]) -> str:
    """The table of csrc/cuda/NOTES.md ("Static SASS budget")."""
    out = ["| backend | kernel: instance | dtype | C | warp-inst/elem | MUFU/elem | ld/st bits | regs | warps/SM "
           "| % roofline | with latency | target |",
           "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        inst = r["instance"].replace("__nv_bfloat16", "bf16").replace("__half", "half")
        if r["backend"] == "triton":
            kv = dict(x.split("=", 1) for x in re.split(r"[,;] ", inst.split(" ", 1)[1]) if "=" in x)
            blocks = [f"{k} {v}" for k, v in kv.items() if k.startswith("BLOCK")]  # the kernel's tile constexprs
            inst = f"{inst.split()[0]} {', '.join(blocks)}, {kv.get('num_warps', '?')} warps"
        out.append(f"| {r['backend']} | {r['kernel']}: `{inst}` | {r['dtype']} | {r['C']} | "
                   f"{r['warp_inst_per_elem']:.2f} | {r['mufu_per_elem']:.3f} | {r['ld_bits']}/{r['st_bits']} | "
                   f"{r['regs']} | {r['warps_per_sm']} | {r['pct_roofline']:.0f}% | {r['pct_roofline_with_latency']:.0f}% "
                   f"| {'met' if r['meets_target'] else 'missed'} ({r['target_pct']:.0f}%) |")
    return "\n".join(out)


def make_limits(rows: list[dict]) -> dict:
    cases = {}
    for r in rows:
        cases[case_key(r)] = {
            "max_warp_inst_per_elem": math.ceil(r["warp_inst_per_elem"] * (1 + MARGIN) * 100) / 100,
            "min_ld_bits": r["ld_bits"], "min_st_bits": r["st_bits"],
        }
    return {
        "_doc": ("Ceilings of `make gpu-budget` (benchmarks/gpu_budget.py): per case the most warp-instructions "
                 "per element and the narrowest dominant load/store width allowed. Set from the measured values "
                 f"+ {MARGIN:.0%}. When kernels improve, tighten: `.venv/bin/python -m benchmarks.gpu_budget "
                 "--update-limits` rewrites this file from the current build; commit it with the kernels."),
        "cases": cases,
    }


def check(rows: list[dict], limits: dict | None, require_targets: bool) -> list[str]:
    errors = []
    if limits is not None:
        cases = limits.get("cases", {})
        seen = set()
        for r in rows:
            key = case_key(r)
            seen.add(key)
            lim = cases.get(key)
            if lim is None:
                errors.append(f"{key}: no ceiling in {LIMITS.name} (new case: --update-limits)")
                continue
            if r["warp_inst_per_elem"] > lim["max_warp_inst_per_elem"]:
                errors.append(f"{key}: {r['warp_inst_per_elem']} warp-instructions per element > ceiling "
                              f"{lim['max_warp_inst_per_elem']}")
            if r["ld_bits"] < lim["min_ld_bits"]:
                errors.append(f"{key}: loads narrowed to {r['ld_bits']} bits (ceiling: >= {lim['min_ld_bits']})")
            if r["st_bits"] < lim["min_st_bits"]:
                errors.append(f"{key}: stores narrowed to {r['st_bits']} bits (ceiling: >= {lim['min_st_bits']})")
        for key in cases:
            if key not in seen:
                errors.append(f"{key}: in {LIMITS.name} but not measured (case dropped?)")
    if require_targets:
        for r in rows:
            if not r["meets_target"]:
                errors.append(f"{case_key(r)}: {r['pct_roofline']}% of the roofline < target {r['target_pct']}%")
    return errors


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    parser.add_argument("--require-targets", action="store_true",
                        help="also fail when a case misses the issue's roofline target")
    parser.add_argument("--update-limits", action="store_true",
                        help=f"rewrite {LIMITS.relative_to(ROOT)} from this build (+{MARGIN:.0%}%)")
    parser.add_argument("--markdown", action="store_true", help="also print the table of csrc/cuda/NOTES.md")
    parser.add_argument("--explain", metavar="REGEX",
                        help="print the counted path's warp-instructions per element by source line for the cases "
                             "whose key (e.g. 'cuda/softmax rows/fp32/C=80') matches")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results (default %(default)s)")
    parser.add_argument("--limits", type=Path, default=LIMITS)
    args = parser.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    global EXPLAIN
    EXPLAIN = args.explain
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_budget_") as tmp:
            if not args.no_cuda:
                rows += run_cuda(Path(tmp))
            if not args.no_triton:
                rows += run_triton(Path(tmp))
    except ModelMismatch as exc:
        print(f"gpu_budget: MODEL MISMATCH: {exc}\n(the kernel's structure no longer matches its work model in "
              f"benchmarks/gpu_budget.py: update the model, see csrc/cuda/NOTES.md)", file=sys.stderr)
        return 2
    commit = git_commit()
    tools = {"nvdisasm": tool_version("nvdisasm"), "cuobjdump": tool_version("cuobjdump")}
    try:
        import triton
        tools["triton"] = triton.__version__
    except ImportError:
        pass
    for r in rows:
        r["git_commit"] = commit
        r["tools"] = tools
        r["machine_model"] = MACHINE_MODEL
        r["method"] = METHOD
        r["measured"] = "static analysis of the sm_90 SASS (no GPU)"
        r["host"] = platform.node()
    if (args.no_cuda or args.no_triton) and args.output.exists():
        # a partial run keeps the other backend's rows of the results file
        skipped = "cuda" if args.no_cuda else "triton"
        try:
            kept = [r for r in json.loads(args.output.read_text()) if r.get("backend") == skipped]
        except (ValueError, AttributeError):
            kept = []
        rows = [r for r in kept if skipped == "cuda"] + rows + [r for r in kept if skipped == "triton"]
        rows_checked = [r for r in rows if r.get("backend") != skipped]
    else:
        rows_checked = rows
    print_table(rows_checked)
    if args.markdown:
        print(markdown_table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"gpu_budget: wrote {args.output} ({len(rows)} cases, git {commit})")
    if args.update_limits:
        limits = make_limits(rows)
        if args.limits.exists() and (args.no_cuda or args.no_triton):
            old = json.loads(args.limits.read_text())
            old["cases"].update(limits["cases"])
            limits["cases"] = old["cases"]
        args.limits.write_text(json.dumps(limits, indent=1, sort_keys=False) + "\n")
        print(f"gpu_budget: wrote {args.limits}")
    limits = json.loads(args.limits.read_text()) if args.limits.exists() else None
    if limits is None:
        print(f"gpu_budget: no {args.limits} (run --update-limits once)", file=sys.stderr)
        return 1
    if args.no_cuda or args.no_triton:
        backend = "cuda" if args.no_triton else "triton"
        limits = {"cases": {k: v for k, v in limits["cases"].items() if k.startswith(backend + "/")}}
    errors = check(rows_checked, limits, args.require_targets)
    for e in errors:
        print(f"gpu_budget: FAIL {e}", file=sys.stderr)
    if not errors:
        print("gpu_budget: every case within its ceiling" + (" and at its target" if args.require_targets else ""))
    return 1 if errors else 0


# ---------------------------------------------------------------------------------------------
# Triton (issue #28 part 1): the kernels compiled for sm_90 exactly as the launcher configures them
# ---------------------------------------------------------------------------------------------
TRITON_ROWS = {80: 8192, 1203: 1024}  # rows of each case: multiples of 16, as a training batch mostly is


def record_triton_launches(call: Callable[[], object]) -> list[tuple]:
    """Runs a launcher of fused_losses/_triton/launch.py on CPU tensors with JITFunction.run
    patched to record (kernel, args, kwargs, grid) instead of compiling and launching. The
    interpreter's InterpretedFunction.run is patched too, so that the tests (TRITON_INTERPRET=1)
    can ask which kernels and constexprs a launcher picks."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = []
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs), grid))
        return None

    for cls in originals:
        cls.run = record
    try:
        call()
    finally:
        for cls, run in originals.items():
            cls.run = run
    return launches


def compile_recorded(fn, args, kwargs, workdir: Path) -> tuple[str, dict, dict]:
    """The cubin of one recorded launch: triton's own binder computes the signature, the
    constexprs and the specialisation attributes (integer values divisible by 16 or equal to
    1, 16-byte aligned pointers) from the recorded arguments, as JITFunction.run does."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    cubin = workdir / f"{fn.__name__}_{len(list(workdir.glob('*.cubin')))}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    named = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
    named = {fn.arg_names[i] if isinstance(i, int) else i: v for i, v in named.items()}
    meta = {"num_warps": options.num_warps, "num_stages": options.num_stages,
            "shared": compiled.metadata.shared, "name": compiled.metadata.name}
    return str(cubin), named, meta


def triton_cases() -> list[tuple[Case, Callable]]:
    import torch

    from fused_losses._triton import launch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out = []
    for name in ("fp32", "bf16"):
        gd = "bf16" if name == "bf16" else "fp32"
        for C in (80, 1203):
            def call(C=C, name=name):
                n = TRITON_ROWS[C]
                x = torch.zeros(n, C, dtype=dt[name])
                t = torch.zeros(n, dtype=torch.int64)
                launch.softmax_focal(x, t, None, 0.25, 2.0, -100, "mean", True, True)
            out.append((Case("triton", "softmax rows", "softmax_focal", name, C, gd, 8 / C), call))

        def call_sig(name=name):
            n = TRITON_ROWS[80]
            x = torch.zeros(n, 80, dtype=dt[name])
            t = torch.zeros(n, dtype=torch.int64)
            launch.sigmoid_focal(x, t, 0.25, 2.0, -100, "mean", True)
        out.append((Case("triton", "sigmoid labels", "sigmoid_focal", name, 80, gd, 8 / 80), call_sig))
    return out


def _whole_kernel(cfg: CFG) -> Loop:
    """The kernel body as a pseudo-loop: entry block to every normal EXIT (a Triton program
    handles its tile once: no grid-stride loop)."""
    exits = tuple(b.id for b in cfg.blocks if not b.error and cfg.fn.instrs[b.end - 1].op == "EXIT"
                  and b.id in cfg._reach)
    lp = Loop(0, frozenset(cfg._reach), exits)
    lp.children = cfg.top_loops()
    return lp


def triton_work(fn_name: str, consts: dict, case: Case, num_warps: int) -> Work:
    if fn_name == "softmax_rows_kernel":
        bm, bc = consts["BLOCK_M"], consts["BLOCK_C"]
        trips = math.ceil(case.C / bc)

        def steady(cfg: CFG) -> Loop:
            lp = _whole_kernel(cfg)
            # every top-level loop must be a `for c0 in range(0, C, BLOCK_C)` column-tile loop
            # (by its source text): any other loop has no trip count in this model
            tile = re.compile(r"for \w+ in (?:tl\.)?range\(0, C, BLOCK_C[,)]")
            for ch in lp.live_children():
                texts = {t for b in ch.body for it in cfg.instrs(b) for t in source_text(it.loc)}
                if not any(tile.search(t) for t in texts):
                    raise ModelMismatch(f"{cfg.fn.name}: a loop that is not a `for c0 in range(0, C, BLOCK_C)` "
                                        f"column-tile loop (no trip count in the model)")
            return lp
        return Work(steady, bm * case.C / num_warps, None, [],
                    f"one program: BLOCK_M = {bm} rows x C, {num_warps} warps; its column-tile loops run "
                    f"ceil(C / BLOCK_C = {bc}) = {trips} time(s) each", tile_trips=trips)
    if fn_name == "sigmoid_kernel":
        blk = consts["BLOCK"]

        def steady(cfg: CFG) -> Loop:
            lp = _whole_kernel(cfg)
            if lp.live_children():
                raise ModelMismatch(f"{cfg.fn.name}: the elementwise kernel has a loop")
            return lp
        return Work(steady, blk / num_warps, [], [], f"one program: BLOCK = {blk} elements, {num_warps} warps")
    if fn_name in ("softmax_focal_tile_kernel", "sigmoid_focal_labels_kernel"):
        # The one-pass tile kernels (issue #28 part 2): one tile of BLOCK_M (BLOCK_R) whole rows per
        # program, straight-line code (the row held in registers: no column loop).
        bm = consts["BLOCK_M" if fn_name == "softmax_focal_tile_kernel" else "BLOCK_R"]

        def steady(cfg: CFG) -> Loop:
            lp = _whole_kernel(cfg)
            if lp.live_children():
                raise ModelMismatch(f"{cfg.fn.name}: the one-pass tile kernel has a loop")
            return lp
        return Work(steady, bm * case.C / num_warps, [], [],
                    f"one program: {bm} rows x C = {case.C} (tile {consts['BLOCK_A']} + {consts['BLOCK_B']} "
                    f"columns), {num_warps} warps, no loop")
    raise ModelMismatch(f"no work model for the Triton kernel {fn_name}")


def run_triton(workdir: Path) -> list[dict]:
    os.environ["TRITON_INTERPRET"] = "0"
    rows = []
    for case, call in triton_cases():
        launches = record_triton_launches(call)
        hot = [l for l in launches if l[0].__name__ in ("softmax_rows_kernel", "sigmoid_kernel",
                                                         "softmax_focal_tile_kernel", "sigmoid_focal_labels_kernel")]
        if len(hot) != 1:
            raise ModelMismatch(f"triton {case.kernel} {case.dtype} C={case.C}: expected one launch of the loss "
                                f"kernel, recorded {[l[0].__name__ for l in launches]}")
        fn, args, kwargs, grid = hot[0]
        cubin, consts, meta = compile_recorded(fn, args, kwargs, workdir)
        funcs = parse_sass(disassemble(cubin))
        if len(funcs) != 1:
            raise ModelMismatch(f"{cubin}: expected one function, found {list(funcs)}")
        (fname, func), = funcs.items()
        res = res_usage(cubin)[fname]
        work = triton_work(fn.__name__, consts, case, meta["num_warps"])
        row = analyse(func, work, case, res, 32 * meta["num_warps"])
        row["instance"] = (f"{fn.__name__} " + ", ".join(f"{k}={v}" for k, v in consts.items() if k.isupper())
                           + f"; num_warps={meta['num_warps']}, num_stages={meta['num_stages']}")
        row["triton_specialisation"] = (f"rows = {TRITON_ROWS[case.C]} (divisible by 16), CPU tensors' 16-byte "
                                        f"aligned pointers, as the CUDA caching allocator gives")
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
