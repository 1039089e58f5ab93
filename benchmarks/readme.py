"""Write the README's performance numbers from a results file of benchmarks/run.py.

    python benchmarks/readme.py [benchmarks/results/latest.json] [--readme README.md]

Replaces the text between <!-- perf:begin --> and <!-- perf:end --> in the
README with tables generated from the results (date and machine included), and
a table of the performance targets with the measured figure and whether it is
met; and the accuracy and time of `bnnet train` between <!-- train:begin -->
and <!-- train:end -->. No number in those parts of the README is typed by hand.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
TRAIN_BEGIN, TRAIN_END = "<!-- train:begin -->", "<!-- train:end -->"


def table(header, rows):
    return ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
            + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows))


def _us(seconds):
    return f"{seconds * 1e6:,.0f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def bn_section(r):
    rows = []
    for shape, e in r["bn"].items():
        b = e["bnnet"]
        row = [shape, _us(b["median"]), f"{b['GBps']:.1f} ({b['pct_bandwidth']:.0f}%)"]
        if "bnnet-out" in e:
            q = e["bnnet-out"]
            row.append(f"{_us(q['median'])}, {q['GBps']:.1f} GB/s ({q['pct_bandwidth']:.0f}%)")
        for peer, label in (("bnnet-numpy", "NumPy reference"), ("torch", "PyTorch"), ("jax", "JAX")):
            if peer in e:
                row.append(f"{e[peer]['median'] / b['median']:.2f}x")
        rows.append(row)
    header = ["shape", "bnnet (new arrays)", "GB/s at 32 B/elem", "bnnet with out="]
    header += [label for peer, label in (("bnnet-numpy", "NumPy reference"), ("torch", "PyTorch"), ("jax", "JAX"))
               if peer in next(iter(r["bn"].values()))]
    return ("BatchNorm forward + backward through the public layer (`layers.BatchNorm`, train mode, float32): "
            "bnnet's median, and each peer's median time divided by bnnet's (> 1: bnnet is faster):\n\n"
            + table(header, rows))


def step_section(r):
    rows = []
    for name, e in r["step"].items():
        b = e["bnnet"]
        row = [name, f"{b['samples_per_s']:,.0f} ({b['threads']} thr)"]
        for peer in ("torch", "jax"):
            if peer in e:
                row.append(f"{e[peer]['samples_per_s']:,.0f} ({e[peer]['threads']} thr): bnnet "
                           f"**{b['samples_per_s'] / e[peer]['samples_per_s']:.2f}x**")
        row.append(f"{100 * e['roofline']['bnnet_fraction']:.0f}%")
        row.append(f"{100 * e['gemm_share']:.0f}%" if "gemm_share" in e else "-")
        rows.append(row)
    return ("Training step through the public API (`model.forward`, `loss.forward`, `model.backward`, "
            "`opt.step`; SGD), samples/s; paper = 784-100-100-100-10 sigmoid + BN at batch 60, wide = "
            "784-512-512-10 ReLU + BN at batch 256:\n\n"
            + table(["net", "bnnet", "PyTorch", "JAX (step under jax.jit)", "bnnet at % of GEMM roofline",
                     "GEMMs alone / bnnet step"], rows))


def targets(r):
    """(target, measured, met) rows."""
    out = []

    def add(what, value, goal, fmt="{:.2f}x", higher=True):
        if value is None:
            return
        met = value >= goal if higher else value <= goal
        out.append([what, fmt.format(value), "met" if met else "**missed**"])

    step = r.get("step", {})
    for name, jax_goal, torch_goal in (("paper", 1.3, 2.5), ("wide", 1.2, None)):
        e = step.get(name)
        if not e:
            continue
        b = e["bnnet"]["samples_per_s"]
        if "jax" in e:
            add(f"{name} net step >= {jax_goal}x JAX", b / e["jax"]["samples_per_s"], jax_goal)
        if torch_goal and "torch" in e:
            add(f"{name} net step >= {torch_goal}x PyTorch", b / e["torch"]["samples_per_s"], torch_goal)
    if "paper" in step and "gemm_share" in step["paper"]:
        add("paper net: GEMMs alone >= 75% of the step", 100 * step["paper"]["gemm_share"], 75, "{:.0f}%")
    if "wide" in step:
        add("wide net >= 90% of its GEMM roofline", 100 * step["wide"]["roofline"]["bnnet_fraction"], 90, "{:.0f}%")
    for shape, goal in (("256x1024", 1.3), ("4096x1024", 1.3), ("100000x100", 2.5), ("1000000x100", 2.5)):
        e = r.get("bn", {}).get(shape)
        if e and "torch" in e:
            add(f"BatchNorm layer {shape} >= {goal}x PyTorch", e["torch"]["median"] / e["bnnet"]["median"], goal)
    for shape in ("100000x100", "1000000x100"):
        e = r.get("bn", {}).get(shape)
        if e:
            add(f"BatchNorm layer {shape} >= 80% of copy bandwidth", e["bnnet"]["pct_bandwidth"], 80, "{:.0f}%")
            if "bnnet-out" in e:
                add(f"BatchNorm layer {shape} with out= >= 80% of copy bandwidth", e["bnnet-out"]["pct_bandwidth"],
                    80, "{:.0f}%")
    busy = r.get("busy", {}).get("default threads")
    if busy:
        add("2 epochs of `bnnet train` next to busy loops <= 2x idle", busy["busy"] / busy["idle"], 2.0, higher=False)
    st = r.get("startup")
    if st:
        add("cold compile of the default train path <= 10 s", st["cold"]["compile_or_load_seconds"], 10, "{:.1f} s",
            higher=False)
        add("warm start <= 0.5 s", st["warm"]["compile_or_load_seconds"], 0.5, "{:.2f} s", higher=False)
    return out


def render(r):
    m = r["machine"]
    parts = [f"Measured {r['date']} with `python benchmarks/run.py` on a {m['cpu_count']}-core machine "
             f"({m['platform']}, Python {m['python']}); {r['rounds']} alternating round(s), every library in its "
             "own process at its best of 1 and 2 threads. Streaming bandwidth: read "
             f"{r['bandwidth']['read_GBps']:.1f} GB/s, copy {r['bandwidth']['copy_GBps']:.1f} GB/s; numpy sgemm "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["sgemm_GFLOPs"].items()) + ".\n"]
    if r.get("bn"):
        parts.append(bn_section(r))
    if r.get("step"):
        parts.append(step_section(r))
    if r.get("busy"):
        parts.append("`bnnet train --epochs 2`, training seconds (median), alone and next to one busy-loop "
                     "process per core:\n\n" + table(
                         ["threads", "idle", "busy", "slowdown"],
                         [[k, f"{v['idle']:.2f}", f"{v['busy']:.2f}", f"{v['busy'] / v['idle']:.2f}x"]
                          for k, v in r["busy"].items()]))
    if r.get("memory"):
        mem = r["memory"]
        parts.append(f"Peak traced memory of a wide-net step at batch 4096: {mem['peak_bytes'] / 2**20:.1f} MiB for "
                     f"{mem['needed_bytes'] / 2**20:.1f} MiB of parameters, gradients, optimizer state, cached "
                     f"activations and input ({mem['ratio']:.2f}x).\n")
    if r.get("fold"):
        parts.append("Prediction of 10,000 rows with BatchNorm folded into the Linears (`bnnet.fold_batchnorm`), "
                     "folded rate over unfolded: " + ", ".join(
                         f"{k} {v['unfolded']['median'] / v['folded']['median']:.2f}x" for k, v in r["fold"].items())
                     + ".\n")
    if r.get("startup"):
        st = r["startup"]
        parts.append(f"Start-up (import + first training step): the kernels compile in "
                     f"{st['cold']['compile_or_load_seconds']:.1f} s with a cold numba cache and load in "
                     f"{st['warm']['compile_or_load_seconds']:.2f} s with a warm one.\n")
    rows = targets(r)
    if rows:
        parts.append("Targets:\n\n" + table(["target", "measured", ""], rows))
    return "\n".join(parts)


def render_train(r):
    """The README's first claim: accuracy and time of `bnnet train` with its defaults."""
    rows = r["train"]
    acc = [row["test_accuracy"] for row in rows]
    first = next(row for row in rows if row["seed"] == 0)
    secs = [row["train_seconds"] for row in rows]
    walls = [row["wall_seconds"] for row in rows]
    return (f"**{first['test_accuracy']:.3f} on the bundled 1,000-image test split, in {min(secs):.1f}-{max(secs):.1f} s of "
            f"training (about {sum(walls) / len(walls):.0f} s wall) on a {r['machine']['cpu_count']}-core machine** "
            f"(measured {r['date'][:10]}; seeds 0-{len(rows) - 1} give {min(acc):.3f}-{max(acc):.3f})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument("--readme", default=os.path.join(HERE, "..", "README.md"))
    args = ap.parse_args(argv)
    with open(args.results) as f:
        r = json.load(f)
    with open(args.readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{args.readme}: no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + BEGIN + "\n" + render(r) + END + tail
    if r.get("train") and TRAIN_BEGIN in text:
        head, rest = text.split(TRAIN_BEGIN, 1)
        _, tail = rest.split(TRAIN_END, 1)
        text = head + TRAIN_BEGIN + render_train(r) + TRAIN_END + tail
    with open(args.readme, "w") as f:
        f.write(text)
    print(f"updated {args.readme} from {args.results}")


if __name__ == "__main__":
    main()
