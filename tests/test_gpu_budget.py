"""The static SASS budget (benchmarks/gpu_budget.py, `make gpu-budget`): the parser, the loop
finder and the path count on small synthetic SASS, the machine model, the gate, and one real
kernel of the built CUDA part (skipped when fused_losses/_C_cuda*.so is not built)."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from benchmarks import gpu_budget as gb

# A kernel: prologue; outer loop (header .L1) with a 128-bit load, an inner loop (.L2, 2
# instructions + its branch), a data branch (.L3 side: 2 instructions), an assert path (CALL.ABS:
# excluded), a BRA.DIV fallback (excluded); back edge to .L1; EXIT.
SYNTH = """
\t.section\t.text.kern,"ax",@progbits
.text.kern:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   MUFU.EX2 R4, R4 ;
.L2:
        /*0040*/                   FADD R5, R5, R4 ;
        /*0050*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0060*/               @P0 BRA `(.L2) ;
        /*0070*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;
        /*0080*/               @P1 BRA `(.L3) ;
        /*0090*/                   FMUL R5, R5, 2 ;
        /*00a0*/                   FMUL R5, R5, 2 ;
.L3:
        /*00b0*/               @P2 BRA `(.LERR) ;
        /*00c0*/                   BRA.DIV UR4, `(.LDIV) ;
.L4:
        /*00d0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00e0*/               @P3 BRA `(.L1) ;
        /*00f0*/                   EXIT ;
.LERR:
        /*0100*/                   CALL.ABS.NOINC R14 ;
        /*0110*/                   BRA `(.LERR) ;
.LDIV:
        /*0120*/                   SHFL.BFLY PT, R4, R4, 0x1, 0x1f ;
        /*0130*/                   SHFL.BFLY PT, R4, R4, 0x2, 0x1f ;
        /*0140*/                   BRA `(.L4) ;
\t.section\t.text.other,"ax",@progbits
.text.other:
        /*0000*/                   EXIT ;
"""


def _cfg():
    funcs = gb.parse_sass(SYNTH)
    assert set(funcs) == {"kern", "other"}
    return gb.CFG(funcs["kern"])


def test_parser_reads_predicates_opcodes_labels():
    fn = gb.parse_sass(SYNTH)["kern"]
    assert len(fn.instrs) == 21
    assert fn.instrs[2].opcode == "LDG.E.128" and fn.instrs[2].op == "LDG"
    assert fn.instrs[6].pred == "@P0" and fn.instrs[6].op == "BRA"
    assert fn.labels[".L1"] == 2 and fn.labels[".LDIV"] == 18


def test_loops_nesting_and_error_blocks():
    cfg = _cfg()
    tops = cfg.top_loops()
    assert len(tops) == 1
    outer = tops[0]
    assert cfg.fn.instrs[cfg.blocks[outer.header].start].addr == 0x20
    assert len(outer.live_children()) == 1
    inner = outer.live_children()[0]
    assert cfg.fn.instrs[cfg.blocks[inner.header].start].addr == 0x40
    err = [b for b in cfg.blocks if b.error]
    assert {cfg.fn.instrs[b.start].addr for b in err} == {0x100}  # the assert (and its self-loop)


@pytest.mark.parametrize("trips", [1, 3, 10])
def test_iteration_count_takes_model_trips_and_skips_error_and_divergence_paths(trips):
    cfg = _cfg()
    outer = cfg.top_loops()[0]
    c = gb.Counter_(cfg, lambda ch, k: trips).iteration(outer)
    # header block: LDG, MUFU (2); inner loop body 3 x trips; ISETP + BRA (2); the heavier side of
    # the data branch: 2 FMUL; @P2 BRA (1); BRA.DIV (1); STG + @P3 BRA (2). Not counted: the
    # assert block, the BRA.DIV fallback (2 SHFL + BRA), the EXIT after the loop.
    assert c.total == 2 + 3 * trips + 2 + 2 + 1 + 1 + 2
    assert c.mufu == 1
    assert dict(c.ld) == {128: 1} and dict(c.st) == {128: 1}
    assert "SHFL" not in c.ops and "CALL" not in c.ops


def test_off_path_blocks_are_not_counted():
    cfg = _cfg()
    outer = cfg.top_loops()[0]
    fmul_block = next(b for b in cfg.blocks if cfg.fn.instrs[b.start].addr == 0x90)
    fmul_block.off_path = True
    c = gb.Counter_(cfg, lambda ch, k: 1).iteration(outer)
    assert c.total == 2 + 3 + 2 + 1 + 1 + 2


def test_no_path_and_irreducible_flow_fail_loudly():
    cfg = _cfg()
    outer = cfg.top_loops()[0]
    for b in cfg.blocks:
        if cfg.fn.instrs[b.start].addr == 0xd0:
            b.off_path = True  # the only way to the back edge
    with pytest.raises(gb.ModelMismatch):
        gb.Counter_(cfg, lambda ch, k: 1).iteration(outer)
    indirect = SYNTH.replace("@P3 BRA `(.L1)", "BRX R4 -0x10")
    with pytest.raises(gb.ModelMismatch):
        gb.CFG(gb.parse_sass(indirect)["kern"])


def test_work_model_rejects_unexpected_structure():
    cfg = _cfg()  # one inner loop: the softmax rows model expects none, the large-C model three
    rows = gb.cuda_work("softmax_rows_kernel", ["float", "float", "4", "32", "1"], 80)
    with pytest.raises(gb.ModelMismatch, match="inner loops"):
        rows.steady(cfg)
    large = gb.cuda_work("softmax_rows_large_kernel", ["float", "float", "1", "false"], 1203)
    assert large.inner_trips == [38, 38, 38]
    with pytest.raises(gb.ModelMismatch, match="inner loops"):
        large.steady(cfg)
    with pytest.raises(gb.ModelMismatch):
        gb.cuda_work("softmax_rows_kernel", ["float", "float", "4", "32", "1"], 200)  # C beyond the registers
    with pytest.raises(gb.ModelMismatch):
        gb.cuda_work("some_new_kernel", [], 80)


def test_launcher_instance_choice():
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp32", 80, "fp32", 0.1)
    assert gb.cuda_instance(case) == ("softmax_rows_kernel", ["float", "float", "4", "8", "3"])
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "bf16", 80, "bf16", 0.1)
    assert gb.cuda_instance(case) == ("softmax_rows_kernel", ["__nv_bfloat16", "__nv_bfloat16", "4", "4", "5"])
    # pick_rows_kernel: 16-bit rows of 9-10 packs of 8 (C = 72, 80) take packs of 4, 4 lanes x 5;
    # 11-12 packs of 8 (C = 88, 96) 4 lanes x 3 packs of 8; fp32 5-12 packs of 4 lanes x 3
    for c, vec, g, items in ((64, "8", "4", "3"), (72, "4", "4", "5"), (80, "4", "4", "5"), (88, "8", "4", "3"),
                             (96, "8", "4", "3"), (104, "8", "8", "3")):
        case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp16", c, "fp32", 0.1)
        assert gb.cuda_instance(case) == ("softmax_rows_kernel", ["__half", "float", vec, g, items]), c
    for c, g, items in ((32, "4", "3"), (36, "4", "3"), (40, "4", "3"), (44, "4", "3"), (48, "4", "3")):
        case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp32", c, "fp32", 0.1)
        assert gb.cuda_instance(case) == ("softmax_rows_kernel", ["float", "float", "4", g, items]), c
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp32", 1203, "fp32", 0.1)  # 1203 % 4: scalar packs
    assert gb.cuda_instance(case) == ("softmax_rows_kernel", ["float", "float", "1", "32", "40"])
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp16", 1203, "fp32", 0.1)
    assert gb.cuda_instance(case) == ("softmax_rows_kernel", ["__half", "float", "1", "32", "40"])
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp32", 4096, "fp32", 0.1)  # past 1280 values
    assert gb.cuda_instance(case) == ("softmax_rows_large_kernel", ["float", "float", "4", "false"])


def test_machine_model():
    # 65536 registers, 256-thread blocks: 48 registers -> 5 blocks (40 warps); 168 with 128 threads -> 12
    assert gb.warps_per_sm(48, 1088, 256) == 40
    assert gb.warps_per_sm(168, 0, 128) == 12
    assert gb.warps_per_sm(16, 0, 256) == 64
    assert gb.warps_per_sm(32, 100 * 1024, 256) == 16  # shared memory: 2 blocks
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp32", 80, "fp32", 8 / 80)
    r = gb.roofline(case, 4.96, 40, 512)
    assert r["bytes_per_elem"] == pytest.approx(8.1)
    assert r["pct_roofline"] == pytest.approx(51.0, abs=0.1)  # the number for 4.96
    assert gb.roofline(case, 1.0, 40, 512)["pct_roofline"] == 100.0
    assert gb.dominant_bits(gb.Counter({128: 1, 64: 1, 32: 3})) == 128
    assert gb.dominant_bits(gb.Counter({64: 1, 32: 114})) == 32


def test_gate():
    row = {"backend": "cuda", "kernel": "softmax rows", "dtype": "fp32", "C": 80, "warp_inst_per_elem": 4.5,
           "ld_bits": 128, "st_bits": 128, "meets_target": False, "pct_roofline": 55.0, "target_pct": 85.0}
    limits = gb.make_limits([row])
    assert limits["cases"]["cuda/softmax rows/fp32/C=80"]["max_warp_inst_per_elem"] == pytest.approx(4.64)
    assert gb.check([row], limits, False) == []
    assert len(gb.check([row], limits, True)) == 1  # --require-targets
    worse = dict(row, warp_inst_per_elem=4.7)
    assert "ceiling" in gb.check([worse], limits, False)[0]
    narrow = dict(row, ld_bits=32)
    assert "narrowed" in gb.check([narrow], limits, False)[0]
    assert "no ceiling" in gb.check([dict(row, C=81)], limits, False)[0]


def _built_cuda():
    so = gb.cuda_so()
    if so is None:
        pytest.skip("the CUDA part fused_losses/_C_cuda*.so is not built (make build with nvcc; CI builds it)")
    try:
        gb.tool("nvdisasm")
    except SystemExit as exc:
        pytest.skip(str(exc))
    return so


def test_real_kernel_softmax_rows_fp32():
    _built_cuda()
    with tempfile.TemporaryDirectory() as tmp:
        funcs, res = gb.load_cuda_functions(gb.cuda_so(), Path(tmp), units=("softmax_kernels",))
    dem = gb.demangle(list(funcs))
    want = "void fused_losses::cuda::softmax_rows_kernel<float, float, 4, 8, 3>"
    name = next(m for m, d in dem.items() if d.startswith(want))
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp32", 80, "fp32", 8 / 80)
    work = gb.cuda_work("softmax_rows_kernel", ["float", "float", "4", "8", "3"], 80)
    row = gb.analyse(funcs[name], work, case, res[name], 256)
    # four rows of 80 per warp-iteration (8 lanes x 3 packs of 4 per row): 128-bit logits loads and
    # gradient stores, one exp per element
    assert row["warp_inst_per_elem"] > 1.0
    assert row["ld_bits"] == 128 and row["st_bits"] == 128
    assert row["mufu_per_elem"] * 4 * 80 >= 12  # at least the 12 exponentials of a lane's 3 packs
    assert row["regs"] > 0 and 0 < row["warps_per_sm"] <= 64
    assert row["off_path_blocks"] > 0  # the other loss kinds' code was found and set aside
    # the large-C kernel keeps its scalar accesses at C = 1203 (not a multiple of 4)
    large = next(m for m, d in dem.items()
                 if d.startswith("void fused_losses::cuda::softmax_rows_large_kernel<float, float, 1, false>"))
    case = gb.Case("cuda", "softmax rows", "softmax_focal", "fp32", 1203, "fp32", 8 / 1203)
    work = gb.cuda_work("softmax_rows_large_kernel", ["float", "float", "1", "false"], 1203)
    row = gb.analyse(funcs[large], work, case, res[large], 256)
    assert row["ld_bits"] == 32 and row["st_bits"] == 32
    assert row["warp_inst_per_elem"] > 1.0


def test_unrolled_guards_run_the_first_c_slots(tmp_path):
    # Three unrolled `if (c < C) { ... }` slots of one source line (2 instructions each); C = 2:
    # the third body is cut. A guard count other than the model's fails.
    src = tmp_path / "k.cu"
    src.write_text("loop\nif (c < C) {\n  body;\n}\n")
    f = str(src)
    slots = ""
    for k in range(3):
        slots += (f'\t//## File "{f}", line 2\n'
                  f"        /*{0x100 + 0x40 * k:04x}*/               @P{k} BRA `(.LS{k}) ;\n"
                  f'\t//## File "{f}", line 3\n'
                  f"        /*{0x110 + 0x40 * k:04x}*/                   FADD R5, R5, R4 ;\n"
                  f"        /*{0x120 + 0x40 * k:04x}*/                   FADD R5, R5, R4 ;\n"
                  f".LS{k}:\n")
    sass = (".text.k:\n        /*0000*/                   S2R R0, SR_TID.X ;\n.LH:\n"
            "        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;\n" + slots +
            "        /*0200*/               @P5 BRA `(.LH) ;\n        /*0210*/                   EXIT ;\n")
    cfg = gb.CFG(gb.parse_sass(sass)["k"])
    loop = cfg.top_loops()[0]
    full = gb.Counter_(cfg, lambda ch, k: 1).iteration(loop).total
    assert full == 1 + 3 * 3 + 1
    gb.apply_unrolled_guards(cfg, loop, r"if \(c < C\)", 2, 3)
    assert gb.Counter_(cfg, lambda ch, k: 1).iteration(loop).total == full - 2
    cfg = gb.CFG(gb.parse_sass(sass)["k"])
    with pytest.raises(gb.ModelMismatch, match="expects 32"):
        gb.apply_unrolled_guards(cfg, cfg.top_loops()[0], r"if \(c < C\)", 2, 32)


def test_calls_on_the_path():
    # the 64-bit division subroutine (called only when an operand exceeds 32 bits) is off the
    # path like a slow path; any other call on the counted path fails (its body is not counted)
    wide = SYNTH.replace("        /*0090*/                   FMUL R5, R5, 2 ;",
                         "        /*0090*/                   CALL.REL.NOINC `($__internal_1_$__cuda_sm20_div_s64) ;")
    cfg = gb.CFG(gb.parse_sass(wide)["kern"])
    c = gb.Counter_(cfg, lambda ch, k: 1).iteration(cfg.top_loops()[0])
    assert c.total == 2 + 3 + 2 + 1 + 1 + 2 and "CALL" not in c.ops
    other = SYNTH.replace("        /*0090*/                   FMUL R5, R5, 2 ;",
                          "        /*0090*/                   CALL.REL.NOINC `(helper) ;")
    cfg = gb.CFG(gb.parse_sass(other)["kern"])
    with pytest.raises(gb.ModelMismatch, match="subroutine call"):
        gb.Counter_(cfg, lambda ch, k: 1).iteration(cfg.top_loops()[0])
