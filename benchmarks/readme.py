"""Write the measured numbers of the README and docs/ from results files of benchmarks/run.py.

    python benchmarks/readme.py [benchmarks/results/latest.json] [--readme README.md]

Replaces the text between <!-- perf:begin --> and <!-- perf:end --> (in the
README or any page of docs/) with tables generated from the results (date and machine included), and
a table of the performance targets with the measured figure and whether it is
met; and the accuracy and time of `bnnet train` between <!-- train:begin -->
and <!-- train:end -->. With --conv (a results file of `run.py --only
bn2d,cnnstep,cnntrain --name conv`), the convolutional tables between <!--
conv:begin --> and <!-- conv:end --> and `bnnet train --model cnn` between <!--
cnntrain:begin --> and <!-- cnntrain:end -->; for each experiment (the summary.json of
`bnnet experiment NAME`, saved as results/experiments/NAME.json), its findings
between <!-- exp-NAME:begin --> and <!-- exp-NAME:end -->. No number in those parts of the README is typed by hand.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
TRAIN_BEGIN, TRAIN_END = "<!-- train:begin -->", "<!-- train:end -->"


def table(header, rows):
    return (
        "| "
        + " | ".join(header)
        + " |\n|"
        + "---|" * len(header)
        + "\n"
        + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    )


def _us(seconds):
    return f"{seconds * 1e6:,.0f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def _level(e):
    """The copy rate the row's percentage is computed from (older results: the streaming one)."""
    return f"{e['level_GBps']:.1f} GB/s" if "level_GBps" in e else "-"


def bn_section(r):
    rows = []
    for shape, e in r["bn"].items():
        b = e["bnnet"]
        row = [shape, _us(b["median"]), f"{b['GBps']:.1f} ({b['pct_bandwidth']:.0f}%)", _level(e)]
        if "bnnet-out" in e:
            q = e["bnnet-out"]
            row.append(f"{_us(q['median'])}, {q['GBps']:.1f} GB/s ({q['pct_bandwidth']:.0f}%)")
        for peer in ("bnnet-numpy", "torch", "jax"):
            if peer in e:
                row.append(f"{e[peer]['median'] / b['median']:.2f}x")
        rows.append(row)
    header = ["shape", "bnnet (new arrays)", "GB/s at 32 B/elem (% of its level's copy rate)", "copy rate there"]
    header += ["bnnet with out="]
    header += [
        label
        for peer, label in (("bnnet-numpy", "NumPy reference"), ("torch", "PyTorch"), ("jax", "JAX"))
        if peer in next(iter(r["bn"].values()))
    ]
    return (
        "BatchNorm forward + backward through the public layer (`layers.BatchNorm`, train mode, float32): "
        "bnnet's median, and each peer's median time divided by bnnet's (> 1: bnnet is faster). The "
        "percentages compare with the copy rate of the memory level the layer's arrays sit in: a copy "
        "between two arrays as large as its working set (x, y, dy, dx: 16 bytes a value), measured in "
        "the same run; in cache for the smaller shapes, DRAM for the largest:\n\n" + table(header, rows)
    )


def step_section(r):
    rows = []
    for name, e in r["step"].items():
        b = e["bnnet"]
        row = [name, f"{b['samples_per_s']:,.0f} ({b['threads']} thr)"]
        for variant in ("bnnet-compiled", "bnnet-fit"):
            row.append(f"{e[variant]['samples_per_s']:,.0f}" if variant in e else "-")
        for peer in ("torch", "jax"):
            if peer in e:
                ratio = f"{b['samples_per_s'] / e[peer]['samples_per_s']:.2f}x"
                if "bnnet-compiled" in e:
                    ratio += f", compiled {e['bnnet-compiled']['samples_per_s'] / e[peer]['samples_per_s']:.2f}x"
                row.append(f"{e[peer]['samples_per_s']:,.0f} ({e[peer]['threads']} thr): bnnet **{ratio}**")
        row.append(f"{100 * e['roofline']['bnnet_fraction']:.0f}%")
        row.append(f"{100 * e['gemm_share']:.0f}%" if "gemm_share" in e else "-")
        rows.append(row)
    return (
        "Training step (forward, loss, backward, SGD update), samples/s: through the public API "
        "(`model.forward`, `loss.forward`, `model.backward`, `opt.step`), as one call of "
        "`bnnet.compile_step`, and per mini-batch of `bnnet.fit`; paper = 784-100-100-100-10 sigmoid + BN "
        "at batch 60, wide = 784-512-512-10 ReLU + BN at batch 256. A peer at 1 thread is pinned to one core:\n\n"
        + table(
            [
                "net",
                "bnnet (lecture loop)",
                "bnnet compile_step",
                "bnnet fit",
                "PyTorch",
                "JAX (step under jax.jit)",
                "bnnet at % of GEMM roofline",
                "GEMMs alone / bnnet step",
            ],
            rows,
        )
    )


def targets(r):
    """(target, measured, met) rows."""
    out = []

    def add(what, value, goal, fmt="{:.2f}x", higher=True):
        if value is None:
            return
        met = value >= goal if higher else value <= goal
        out.append([what, fmt.format(value), "met" if met else "**missed**"])

    step = r.get("step", {})
    for name, jax_goal, torch_goal in (("paper", 1.4, 2.5), ("wide", 1.05, 1.1)):
        e = step.get(name)
        if not e:
            continue
        for variant, label in (("bnnet", "lecture-loop"), ("bnnet-compiled", "compiled"), ("bnnet-fit", "fit")):
            if variant not in e:
                continue
            b = e[variant]["samples_per_s"]
            if "jax" in e:
                add(f"{name} net {label} step >= {jax_goal}x JAX", b / e["jax"]["samples_per_s"], jax_goal)
            if "torch" in e:
                add(f"{name} net {label} step >= {torch_goal}x PyTorch", b / e["torch"]["samples_per_s"], torch_goal)
        if "bnnet-fit" in e and "bnnet-compiled" in e:
            add(
                f"{name} net: fit within 5% of the compiled step",
                100 * (e["bnnet-compiled"]["samples_per_s"] / e["bnnet-fit"]["samples_per_s"] - 1),
                5,
                "{:.0f}% slower",
                higher=False,
            )
    if "paper" in step and "gemm_share" in step["paper"]:
        add("paper net: GEMMs alone >= 75% of the step", 100 * step["paper"]["gemm_share"], 75, "{:.0f}%")
    if "wide" in step:
        add("wide net >= 85% of its GEMM roofline", 100 * step["wide"]["roofline"]["bnnet_fraction"], 85, "{:.0f}%")
    for shape, goal in (("256x1024", 1.2), ("4096x1024", 1.2), ("100000x100", 2.0), ("1000000x100", 2.0)):
        e = r.get("bn", {}).get(shape)
        if e and "torch" in e:
            add(f"BatchNorm layer {shape} >= {goal}x PyTorch", e["torch"]["median"] / e["bnnet"]["median"], goal)
    for shape in ("256x1024", "4096x1024", "100000x100", "1000000x100"):
        e = r.get("bn", {}).get(shape)
        if e:
            add(f"BatchNorm layer {shape} >= 80% of its level's copy rate", e["bnnet"]["pct_bandwidth"], 80, "{:.0f}%")
            if "bnnet-out" in e:
                add(
                    f"BatchNorm layer {shape} with out= >= 80% of its level's copy rate",
                    e["bnnet-out"]["pct_bandwidth"],
                    80,
                    "{:.0f}%",
                )
    busy = r.get("busy", {}).get("default threads")
    if busy:
        add("2 epochs of `bnnet train` next to busy loops <= 2x idle", busy["busy"] / busy["idle"], 2.0, higher=False)
    st = r.get("startup")
    if st:
        add(
            "cold compile of the default train path <= 10 s",
            st["cold"]["compile_or_load_seconds"],
            10,
            "{:.1f} s",
            higher=False,
        )
        add("warm start <= 0.5 s", st["warm"]["compile_or_load_seconds"], 0.5, "{:.2f} s", higher=False)
        if "cnn cold" in st:
            seconds = st["cnn cold"]["compile_or_load_seconds"]
            add("cold compile of the convnet train path <= 15 s", seconds, 15, "{:.1f} s", higher=False)
    return out


def render(r):
    m = r["machine"]
    parts = [
        f"Measured {r['date']} with `python benchmarks/run.py` on a {m['cpu_count']}-core machine "
        f"({m['platform']}, Python {m['python']}); {r['rounds']} alternating round(s), every library in its "
        "own process at its best of 1 and 2 threads. Streaming bandwidth: read "
        f"{r['bandwidth']['read_GBps']:.1f} GB/s, copy {r['bandwidth']['copy_GBps']:.1f} GB/s; numpy sgemm "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["sgemm_GFLOPs"].items())
        + ".\n"
    ]
    if r.get("bn"):
        parts.append(bn_section(r))
    if r.get("step"):
        parts.append(step_section(r))
    if r.get("busy"):
        parts.append(
            "`bnnet train --epochs 2`, training seconds (median), alone and next to one busy-loop "
            "process per core:\n\n"
            + table(
                ["threads", "idle", "busy", "slowdown"],
                [
                    [k, f"{v['idle']:.2f}", f"{v['busy']:.2f}", f"{v['busy'] / v['idle']:.2f}x"]
                    for k, v in r["busy"].items()
                ],
            )
        )
    if r.get("memory"):
        mem = r["memory"]
        parts.append(
            f"Peak traced memory of a wide-net step at batch 4096: {mem['peak_bytes'] / 2**20:.1f} MiB for "
            f"{mem['needed_bytes'] / 2**20:.1f} MiB of parameters, gradients, optimizer state, cached "
            f"activations and input ({mem['ratio']:.2f}x).\n"
        )
    if r.get("fold"):
        parts.append(
            "Prediction of 10,000 rows with BatchNorm folded into the Linears (`bnnet.fold_batchnorm`), "
            "folded rate over unfolded: "
            + ", ".join(f"{k} {v['unfolded']['median'] / v['folded']['median']:.2f}x" for k, v in r["fold"].items())
            + ".\n"
        )
    if r.get("startup"):
        st = r["startup"]
        parts.append(
            f"Start-up (import + first training step): the kernels compile in "
            f"{st['cold']['compile_or_load_seconds']:.1f} s with a cold numba cache and load in "
            f"{st['warm']['compile_or_load_seconds']:.2f} s with a warm one"
            + (
                f"; those of `bnnet.convnet()` compile in {st['cnn cold']['compile_or_load_seconds']:.1f} s and load "
                f"in {st['cnn warm']['compile_or_load_seconds']:.2f} s"
                if "cnn cold" in st
                else ""
            )
            + ".\n"
        )
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
    return (
        f"**{first['test_accuracy']:.3f} on the bundled 1,000-image test split, "
        f"in {min(secs):.1f}-{max(secs):.1f} s of "
        f"training (about {sum(walls) / len(walls):.0f} s wall) on a {r['machine']['cpu_count']}-core machine** "
        f"(measured {r['date'][:10]}; seeds 0-{len(rows) - 1} give {min(acc):.3f}-{max(acc):.3f})"
    )


def _machine(r):
    m = r["machine"]
    return f"{m['cpu_count']}-core machine ({m['platform']}, Python {m['python']})"


def render_conv(r):
    """Spatial BatchNorm and the convnet step against PyTorch and JAX, with their targets."""
    parts = [
        f"Measured {r['date']} with `python benchmarks/run.py --only bn2d,cnnstep,cnntrain --name conv` on a "
        f"{_machine(r)}; {r['rounds']} alternating round(s), each library in its own process at its best of 1 "
        f"and 2 threads. Copy bandwidth {r['bandwidth']['copy_GBps']:.1f} GB/s; numpy sgemm 2048^3 "
        f"{r['sgemm_GFLOPs']['2048x2048x2048']:.0f} GFLOP/s.\n"
    ]
    out, peers = [], ("torch", "jax")

    def add(what, value, goal, fmt="{:.2f}x"):
        out.append([what, fmt.format(value), "met" if value >= goal else "**missed**"])

    if r.get("bn2d"):
        rows = []
        for shape, e in r["bn2d"].items():
            b = e["bnnet"]
            rows.append(
                [shape, _us(b["median"]), f"{b['GBps']:.1f} ({b['pct_bandwidth']:.0f}%)", _level(e)]
                + [f"{e[p]['median'] / b['median']:.2f}x" for p in peers if p in e]
            )
            if "torch" in e:
                add(f"BatchNorm (N, C, H, W) {shape} >= 2x PyTorch", e["torch"]["median"] / b["median"], 2.0)
            add(f"BatchNorm (N, C, H, W) {shape} >= 70% of its level's copy rate", b["pct_bandwidth"], 70, "{:.0f}%")
        parts.append(
            "BatchNorm over `(N, C, H, W)` through the public layer, forward + backward (train mode, "
            "float32): bnnet's median, and each peer's median divided by bnnet's (> 1: bnnet is faster):\n\n"
            + table(
                ["shape", "bnnet", "GB/s at 32 B/elem (% of its level's copy rate)", "copy rate there"]
                + [p for p in ("PyTorch", "JAX")],
                rows,
            )
        )
    e = r.get("cnnstep")
    if e:
        b = e["bnnet"]
        row = [f"{b['samples_per_s']:,.0f} ({b['threads']} thr)"]
        for p in peers:
            if p in e:
                row.append(
                    f"{e[p]['samples_per_s']:,.0f} ({e[p]['threads']} thr): bnnet "
                    f"**{b['samples_per_s'] / e[p]['samples_per_s']:.2f}x**"
                )
                add(
                    f"convnet step >= 1.0x {'PyTorch' if p == 'torch' else 'JAX'}",
                    b["samples_per_s"] / e[p]["samples_per_s"],
                    1.0,
                )
        row += [f"{100 * e['roofline']['bnnet_fraction']:.0f}%", f"{100 * e['conv_share']:.0f}%"]
        parts.append(
            "Training step of `bnnet.convnet()` (conv 32-64, fc 128, 28x28 input, batch 64, SGD) through "
            "the public API, samples/s:\n\n"
            + table(
                [
                    "bnnet",
                    "PyTorch",
                    "JAX (step under jax.jit)",
                    "bnnet at % of GEMM roofline",
                    "time in Conv2d layers (im2col, GEMMs, col2im)",
                ],
                [row],
            )
        )
    if out:
        parts.append("Targets:\n\n" + table(["target", "measured", ""], out))
    return "\n".join(parts)


def render_cnntrain(r):
    row = r["cnntrain"][0]
    return (
        f"**{row['test_accuracy']:.3f} test accuracy after 20 epochs, in {row['train_seconds']:.0f} s of training "
        f"({row['wall_seconds']:.0f} s wall) on a {r['machine']['cpu_count']}-core machine** (seed "
        f"{row['seed']}, measured {r['date'][:10]})"
    )


def render_fig1(e):
    """Figure 1's findings: a table and the sentence that reads it."""

    def step(tag):
        v = e[f"steps_to_90_{tag}"]
        return f"{v:,}" if v is not None else f"not in {e['steps']:,}"

    table_ = table(
        ["", "with BN", "without BN"],
        [
            ["final test accuracy", f"{e['final_accuracy_bn']:.3f}", f"{e['final_accuracy_nobn']:.3f}"],
            ["first step with test accuracy >= 0.9", step("bn"), step("nobn")],
            [
                "range of the median sigmoid input after the first 10% of steps",
                f"{e['median_drift_bn']:.2f}",
                f"{e['median_drift_nobn']:.2f}",
            ],
        ],
    )
    return f"\n{_measured(e)}\n\n" + table_


def _measured(e):
    return (
        f"{e['data']}, seed {e['seed']}, {e.get('steps', e.get('epochs')):,} "
        f"{'steps' if 'steps' in e else 'epoch(s) per run'}; measured {e['date'][:10]} on a "
        f"{e['machine']['cpu_count']}-core machine ({e['experiment']}.json in benchmarks/results/experiments)"
    )


def render_lr_sweep(e):
    def span(key):
        r = e["stable_ranges"][key]
        return "none" if r is None else f"{r[0]:.3g} to {r[1]:.3g}"

    rows = [[opt, span(f"{opt}_bn"), span(f"{opt}_nobn")] for opt in ("sgd", "momentum", "adam")]
    return f"\n{_measured(e)}; {len(e['lrs'])} learning rates from {min(e['lrs']):g} to {max(e['lrs']):g}:\n\n" + table(
        ["optimizer", "learning rates that train stably, with BN", "without BN"], rows
    )


def render_optimizers(e):
    f = e["final_accuracy"]
    rows = [[opt, f"{f[opt + '_bn']:.3f}", f"{f[opt + '_nobn']:.3f}"] for opt in e["lrs"]]
    return (
        f"\n{_measured(e)}; learning rates "
        + ", ".join(f"{k} {v:g}" for k, v in e["lrs"].items())
        + ":\n\n"
        + table(["optimizer", "final test accuracy with BN", "without BN"], rows)
    )


def render_batch_size(e):
    res = e["results"]
    norms = [n for n in ("batch", "renorm", "ghost") if f"{n}_{e['sizes'][0]}" in res]
    rows = [[b] + [f"{res[f'{n}_{b}'][0]:.3f} / {res[f'{n}_{b}'][1]:.3f}" for n in norms] for b in e["sizes"]]
    labels = {"batch": "BatchNorm", "renorm": "Batch Renorm", "ghost": "Ghost BN"}
    return (
        f"\n{_measured(e)}; Adam lr {e['lr']:g}. Each cell: eval-mode test accuracy / train-eval gap "
        "(mean |train-mode - eval-mode logits| / mean |eval-mode logits|):\n\n"
        + table(["batch"] + [labels[n] for n in norms], rows)
    )


def render_cnn(e):
    """The cnn experiment's findings from its summary.json."""
    first, final = e["first_step_95"], e["final_accuracy"]

    def step(tag):
        return f"step {first[tag]:,}" if first[tag] is not None else f"never in {e['steps']:,} steps"

    return (
        f"({e['net']}, SGD lr {e['lr']:g}, {e['steps']:,} steps per run, seed {e['seed']}, measured "
        f"{e['date'][:10]} on a {e['machine']['cpu_count']}-core machine in {e['seconds'] / 60:.0f} min): with BN "
        f"at batch 60 the net first reaches 95% test accuracy at {step('bn')}, without BN at {step('nobn')}; "
        f"final test accuracy {final['bn']:.3f} vs {final['nobn']:.3f}. At batch 4, BatchNorm reaches 95% at "
        f"{step('bn_b4')} and ends at {final['bn_b4']:.3f}; Batch Renorm at {step('renorm_b4')}, ending at "
        f"{final['renorm_b4']:.3f}."
    )


EXPERIMENT_RENDERERS = {
    "fig1": render_fig1,
    "lr-sweep": render_lr_sweep,
    "optimizers": render_optimizers,
    "batch-size": render_batch_size,
    "cnn": render_cnn,
}


def experiment_blocks(folder):
    """{(begin, end): text} for each experiment whose summary.json is saved in `folder` as <name>.json:
    the block <!-- exp-<name>:begin --> ... <!-- exp-<name>:end --> of the docs."""
    blocks = {}
    for name, render in EXPERIMENT_RENDERERS.items():
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                blocks[f"<!-- exp-{name}:begin -->", f"<!-- exp-{name}:end -->"] = render(json.load(f))
    return blocks


def render_commands(c):
    """How long the two commands took from a fresh clone (scripts/time_commands.py)."""
    return (
        f"from a fresh clone on a {c['machine']['cpu_count']}-core machine ({c['date'][:10]}): the first "
        f"command took {c['first_command_seconds'] / 60:.1f} min (installing, compiling the kernels, training), "
        f"the test command {c['test_command_seconds'] / 60:.0f} min ({c['test_summary'].strip('= ')})"
    )


def _fill(text, begin, end, body):
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + body + end + tail


def rendered_pages(readme, results, conv=None):
    """{page path: its text with every measured block rendered from the results files}; SystemExit if a
    block has no page."""
    blocks = {}  # (begin, end) -> text
    with open(results) as f:
        r = json.load(f)
    blocks[BEGIN, END] = "\n" + render(r)
    if r.get("train"):
        blocks[TRAIN_BEGIN, TRAIN_END] = render_train(r)
    conv = conv or os.path.join(HERE, "results", "conv.json")
    if os.path.exists(conv):
        with open(conv) as f:
            c = json.load(f)
        blocks["<!-- conv:begin -->", "<!-- conv:end -->"] = "\n" + render_conv(c)
        if c.get("cnntrain"):
            blocks["<!-- cnntrain:begin -->", "<!-- cnntrain:end -->"] = render_cnntrain(c)
    blocks.update(experiment_blocks(os.path.join(HERE, "results", "experiments")))
    commands = os.path.join(HERE, "results", "commands.json")
    if os.path.exists(commands):
        with open(commands) as f:
            blocks["<!-- commands:begin -->", "<!-- commands:end -->"] = render_commands(json.load(f))
    docs = os.path.join(os.path.dirname(os.path.abspath(readme)), "docs")
    pages = [readme] + sorted(os.path.join(docs, p) for p in os.listdir(docs) if p.endswith(".md"))
    out, filled = {}, set()
    for page in pages:
        with open(page) as f:
            text = f.read()
        for (begin, end), body in blocks.items():
            if begin in text and end in text:
                text = _fill(text, begin, end, body)
                filled.add(begin)
        out[page] = text
    missing = [begin for begin, _ in blocks if begin not in filled]
    if missing:
        sys.exit(f"no page holds the blocks {missing}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument(
        "--readme",
        default=os.path.join(HERE, "..", "README.md"),
        help="the README; the pages of docs/ beside it are filled too",
    )
    ap.add_argument("--conv", default=None, help="results of run.py --name conv (default results/conv.json if any)")
    args = ap.parse_args(argv)
    pages = rendered_pages(args.readme, args.results, args.conv)
    for page, text in pages.items():
        with open(page, "w") as f:
            f.write(text)
    print(f"updated {len(pages)} pages from {args.results}")


if __name__ == "__main__":
    main()
