"""bnnet's benchmark suite: one command, tables on stdout, JSON + markdown in benchmarks/results/.

    pip install ".[bench]" && python benchmarks/run.py [--quick] [--rounds 3] [--out benchmarks/results]

What it measures (see docs/performance.md for the latest tables):
  1. the machine: streaming bandwidth (read, copy) and numpy's sgemm GFLOP/s;
  2. BatchNorm forward+backward (train mode, float32) at five shapes: bnnet
     (numba kernels), bnnet (NumPy reference), PyTorch (F.batch_norm + autograd),
     JAX (jit of BN and its vjp): min/median, ns/element, GB/s at 32 bytes/element;
  3. a full training step (forward, loss, backward, SGD update) of the paper's
     net and of a wide net, bnnet vs torch vs JAX (whole step under jax.jit),
     with each net's GEMM roofline;
  4. peak memory of a wide-net step at batch 4096 against what it must hold;
  5. start-up: a first training step with a cold and with a warm numba cache;
  6. data-parallel training under MPI (benchmarks/mpi_step.py): step time of both
     nets on 1, 2 and 4 ranks with synchronized and local BatchNorm, time in
     collectives and bytes communicated per step;
  7. convolutional nets (sections bn2d, cnnstep, cnntrain; `--only bn2d,cnnstep,cnntrain
     --name conv` writes them to conv.json/conv.md on their own): BatchNorm over (N, C, H, W),
     a training step of bnnet.convnet vs the same net in torch and JAX, and
     `bnnet train --model cnn` with its defaults.
Every library runs in its own worker process (benchmarks/workers.py), one at a
time, alternating round by round, at 1 and 2 threads; each is reported at its
best thread count. Timing never goes into the unit tests: this is the place.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BN_SHAPES = [(64, 100), (256, 1024), (4096, 1024), (100000, 100), (1000000, 100)]
NETS = {
    "paper": {"sizes": [784, 100, 100, 100, 10], "activation": "sigmoid", "batch": 60, "lr": 0.1},
    "wide": {"sizes": [784, 512, 512, 10], "activation": "relu", "batch": 256, "lr": 0.1},
}
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
BYTES_PER_ELEMENT = 32  # BN fwd+bwd: read x twice, write y, read dy/x twice, write dx (4-byte floats)
BN2D_SHAPES = [(64, 64, 32, 32), (256, 32, 28, 28)]
CNN = {"channels": [32, 64], "hidden": [128], "batch": 64, "lr": 0.05}  # bnnet.convnet's defaults, batch 64


def cnn_flops(channels, hidden, batch, side=28):
    """Multiply-adds x 2 of the convnet's convolutions (3x3, padding 1, 2x2 pools) and Linears, forward and
    backward (3 GEMMs each: y, dW, dx; none for dx of the first layer)."""
    flops, c, s, first = 0, 1, side, True
    for out in channels:
        one = 2 * batch * s * s * out * c * 9
        flops += one * (2 if first else 3)
        c, s, first = out, s // 2, False
    width = c * s * s
    for h in [*hidden, 10]:
        flops += 3 * 2 * batch * width * h
        width = h
    return flops


class Worker:
    """A benchmark worker process for one library at one thread count."""

    def __init__(self, lib, threads, unset=()):
        env = dict(os.environ)
        for var in unset:
            env.pop(var, None)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[var] = str(threads)
        if lib == "jax" and threads == 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        self.lib, self.threads = lib, threads
        # "1 thread" means one core: a library's thread flags alone may still let it use more (JAX's
        # XLA runtime keeps helper threads busy: about 1.75 cores), so the process is pinned.
        one_core = min(os.sched_getaffinity(0)) if threads == 1 and hasattr(os, "sched_setaffinity") else None
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "workers.py"), lib],
            env=env,
            preexec_fn=None if one_core is None else (lambda: os.sched_setaffinity(0, {one_core})),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"worker {lib} failed to start (is it installed? pip install '.[bench]')")

    def ask(self, **task):
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        if "error" in result:
            raise RuntimeError(f"{self.lib} ({self.threads} threads) failed on {task['task']}: {result['error']}")
        return result

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def summarize(times):
    return {"min": min(times), "median": statistics.median(times), "n": len(times)}


def alternate(workers, rounds, task):
    """Run `task` on every worker, one after the other, `rounds` times; pool each worker's times."""
    pooled = {key: [] for key in workers}
    for _ in range(rounds):
        for key, w in workers.items():
            pooled[key] += w.ask(**task)["times"]
    return {key: summarize(t) for key, t in pooled.items()}


def best_threads(results, lib):
    """The thread count with the lowest median for `lib`, and its summary."""
    options = {th: r for (l, th), r in results.items() if l == lib}
    th = min(options, key=lambda k: options[k]["median"])
    return th, options[th]


def gemm_flops(sizes, batch):
    """Matmul FLOPs of one step: forward and dW for every Linear, dx for all but the first."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    return sum(2 * 2 * batch * i * o for i, o in pairs) + sum(2 * batch * i * o for i, o in pairs[1:])


def bn_bytes(sizes, batch):
    """Memory traffic of the fused BN + activation kernels of one step (32 bytes per element)."""
    return sum(BYTES_PER_ELEMENT * batch * d for d in sizes[1:-1])


STARTUP_MODELS = {  # what `bnnet train` builds: the paper's net, and `--model cnn`
    "mlp": ("bnnet.mlp([784, 100, 100, 100, 10], activation='sigmoid', seed=0)", "(60, 784)"),
    "cnn": ("bnnet.convnet(seed=0)", "(64, 1, 28, 28)"),
}


def startup(cache_dir, model="mlp"):
    """Seconds of a fresh process: import, first training step (compiles or loads kernels), steady step."""
    build, shape = STARTUP_MODELS[model]
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import numpy as np, bnnet\n"
        "t1 = time.perf_counter()\n"
        f"m = {build}; opt = bnnet.optim.Adam(1e-3)\n"
        "L = bnnet.losses.SoftmaxCrossEntropy()\n"
        f"X = np.random.rand(*{shape}).astype(np.float32); y = np.arange(len(X)) % 10\n"
        "def step():\n"
        "    L.forward(m.forward(X, train=True), y); m.backward(L.backward()); opt.step(m); m.predict(X)\n"
        "t2 = time.perf_counter(); step(); t3 = time.perf_counter()\n"
        "for _ in range(20): step()\n"
        "t4 = time.perf_counter()\n"
        "print(t1 - t0, t3 - t2, (t4 - t3) / 20)\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, BNNET_BACKEND="numba")
    wall = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - wall
    imp, first, steady = map(float, out.split())
    return {
        "process_seconds": wall,
        "import_seconds": imp,
        "first_step_seconds": first,
        "steady_step_seconds": steady,
        "compile_or_load_seconds": first - steady,
    }


def _train_seconds(env):
    """The training time of `bnnet train --epochs 2`, from the run's summary.json."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "bnnet", "train", "--epochs", "2", "--quiet", "--out", out],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)["train_seconds"]


def train_section(options=(), seeds=(0, 1, 2)):
    """`bnnet train --seed s [options]` for each seed (kernels already compiled): accuracy and times."""
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            wall = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "bnnet", "train", *options, "--seed", str(seed), "--quiet", "--out", out],
                capture_output=True,
                text=True,
                check=True,
            )
            wall = time.perf_counter() - wall
            with open(os.path.join(out, "summary.json")) as f:
                summary = json.load(f)
        rows.append(
            {
                "seed": seed,
                "test_accuracy": summary["test_accuracy"],
                "train_seconds": summary["train_seconds"],
                "wall_seconds": wall,
            }
        )
    return rows


def busy_section(cores, rounds, log):
    """2 epochs of bnnet train, idle and next to `cores` busy-loop processes, with the default
    threads and with OPENBLAS_NUM_THREADS=1; rounds alternate idle and busy."""
    settings = {
        "default threads": dict(os.environ),
        "OPENBLAS_NUM_THREADS=1": dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    }
    times = {k: {"idle": [], "busy": []} for k in settings}
    for _ in range(max(rounds, 5)):  # runs next to busy loops are bimodal: take enough for a median
        for name, env in settings.items():
            times[name]["idle"].append(_train_seconds(env))
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
        try:
            time.sleep(0.5)
            for name, env in settings.items():
                times[name]["busy"].append(_train_seconds(env))
        finally:
            for p in loops:
                p.kill()
    out = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
    log("busy", json.dumps(out))
    return out


def mpi_section(quick, log):
    """Run benchmarks/mpi_step.py under this environment's mpiexec for each net and rank count."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    results = []
    for net, steps in (("paper", 300), ("wide", 100)):
        cfg = dict(NETS[net], steps=steps // (3 if quick else 1), rounds=1 if quick else 3)
        for k in (1, 2, 4):
            proc = subprocess.run(
                [mpiexec, "-n", str(k), sys.executable, os.path.join(HERE, "mpi_step.py"), json.dumps(cfg)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode:
                raise RuntimeError(f"mpi_step.py on {k} ranks failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append({"net": net, "batch": cfg["batch"], **row})
            log(net, k, json.dumps(row))
    return results


def mpi_markdown(results):
    rows = []
    for r in results:
        for mode in ("single", "sync", "local"):
            if mode not in r:
                continue
            m = r[mode]
            extra = ""
            if mode == "sync":
                extra = f"{100 * (m['step_ms'] / r['local']['step_ms'] - 1):+.0f}%"
            rows.append(
                [
                    r["net"],
                    r["batch"],
                    r["ranks"],
                    mode,
                    f"{m['step_ms']:.3f}",
                    f"{r['batch'] / m['step_ms'] * 1e3:,.0f}",
                    f"{m['comm_ms']:.3f}",
                    f"{m['calls_per_step']:.0f}",
                    f"{m['bytes_per_step'] / 1024:.1f}",
                    extra,
                ]
            )
    return (
        "\n## Data-parallel training over MPI (one thread per rank, SGD, float32)\n\n"
        "Global batch split over the ranks; comm = time inside collectives per step (waiting for the "
        "slower rank included); KiB = bytes this rank hands to MPI per step; SyncBN cost = sync step time "
        "over local-BN step time at the same rank count.\n\n"
        + fmt_table(
            [
                "net",
                "batch",
                "ranks",
                "BN",
                "step ms",
                "samples/s",
                "comm ms",
                "collectives",
                "KiB/step",
                "SyncBN cost",
            ],
            rows,
        )
    )


def fmt_table(header, rows):
    line = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    return line + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and repetitions, smaller big shapes (CI smoke)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per case (default 3, quick 1)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--libs", default="bnnet,bnnet-numpy,torch,jax")
    ap.add_argument("--threads", default=None, help="thread counts to try, e.g. 1,2 (default: 1 and all cores)")
    ap.add_argument("--name", default="latest", help="results file name: <name>.json and <name>.md (default latest)")
    ap.add_argument(
        "--only",
        default="bn,flat,step,fold,memory,startup,train,busy,mpi,bn2d,cnnstep,cnntrain",
        help="sections to run after the machine measurements (default: all)",
    )
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    reps = 3 if args.quick else 10
    libs = args.libs.split(",")
    only = set(args.only.split(","))
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    shapes = [(n, d) for n, d in BN_SHAPES if not args.quick or n * d <= 4_000_000]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpu_count": cores,
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": sys.version.split()[0],
            "blas_env": {v: os.environ.get(v) for v in BLAS_OVERRIDES},
        },
        "rounds": rounds,
    }
    md = [
        f"# bnnet benchmarks, {report['date']}\n",
        f"Machine: {cores} cores, {platform.platform()}; "
        f"BLAS environment: {report['machine']['blas_env']}; {rounds} alternating round(s).\n",
    ]

    def log(*a):
        print(*a, flush=True)

    workers = {}
    try:
        for lib in libs:
            for th in threads:
                workers[(lib, th)] = Worker(lib, th)
        report["libraries"] = {f"{lib}@{th}": w.ask(task="info") for (lib, th), w in workers.items()}
        for key, info in report["libraries"].items():
            log(key, json.dumps(info)[:300])
        ours = workers.get(("bnnet", cores)) or workers[("bnnet", threads[-1])]

        # 1. machine
        bw_elements = 25_000_000 if args.quick else 100_000_000
        bw = ours.ask(task="bandwidth", elements=bw_elements)
        sgemm_shapes = [(2048, 2048, 2048), (60, 784, 100), (256, 784, 512), (256, 512, 512)]
        gemm = ours.ask(task="sgemm", shapes=sgemm_shapes, reps=reps)
        bandwidth = max(bw["read_GBps"], bw["copy_GBps"])
        report["bandwidth"], report["sgemm_GFLOPs"] = bw, gemm
        report["copy_rates"] = {}  # working-set bytes -> GB/s of a copy that size

        def level_bandwidth(elements):
            """The rate of the memory level a BatchNorm over `elements` values works in: the best copy
            rate (bnnet's threads or numpy's one) between two arrays as large as its working set (x, y,
            dy, dx: 16 bytes a value), in cache when they fit, else from DRAM (the bandwidth above)."""
            size = 2 * elements  # float32 values in each of the two arrays
            if size >= bw_elements:
                return bandwidth
            key = str(16 * elements)
            if key not in report["copy_rates"]:
                rates = ours.ask(task="bandwidth", elements=size)
                report["copy_rates"][key] = max(rates["copy_GBps"], rates["numpy_copy_GBps"])
            return report["copy_rates"][key]

        md.append(
            f"\n## Machine\n\nStreaming bandwidth ({cores} threads): read {bw['read_GBps']:.1f} GB/s, "
            f"copy {bw['copy_GBps']:.1f} GB/s (numpy copy, 1 thread: {bw['numpy_copy_GBps']:.1f} GB/s). "
            "numpy sgemm: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gemm.items()) + ".\n"
        )
        log(md[-1])

        # 2. BatchNorm forward + backward
        bn_rows, report["bn"] = [], {}
        for n, d in shapes if "bn" in only else []:
            res = alternate(
                workers, rounds, dict(task="bn", shape=[n, d], reps=reps, min_seconds=0.2 if args.quick else 0.5)
            )
            entry = {}
            for lib in libs:
                th, r = best_threads(res, lib)
                entry[lib] = {
                    **r,
                    "threads": th,
                    "ns_per_element": r["median"] / (n * d) * 1e9,
                    "GBps": BYTES_PER_ELEMENT * n * d / r["median"] / 1e9,
                }
                entry[lib]["pct_bandwidth"] = 100 * entry[lib]["GBps"] / level_bandwidth(n * d)
            entry["level_GBps"] = level_bandwidth(n * d)
            if "bnnet" in libs:  # the public layer writing into the caller's buffers (out=)
                r = summarize(
                    sum(
                        (
                            ours.ask(
                                task="bn", shape=[n, d], reps=reps, out=True, min_seconds=0.2 if args.quick else 0.5
                            )["times"]
                            for _ in range(rounds)
                        ),
                        [],
                    )
                )
                entry["bnnet-out"] = {**r, "GBps": BYTES_PER_ELEMENT * n * d / r["median"] / 1e9}
                entry["bnnet-out"]["pct_bandwidth"] = 100 * entry["bnnet-out"]["GBps"] / level_bandwidth(n * d)
            report["bn"][f"{n}x{d}"] = entry
            o = entry["bnnet"]
            row = [
                f"{n}x{d}",
                f"{o['min'] * 1e6:.0f} / {o['median'] * 1e6:.0f}",
                f"{o['ns_per_element']:.2f}",
                f"{o['GBps']:.1f} ({o['pct_bandwidth']:.0f}%)",
            ]
            for peer in [l for l in libs if l != "bnnet"]:
                row.append(f"{entry[peer]['median'] * 1e6:.0f} us = **{entry[peer]['median'] / o['median']:.2f}x**")
            if "bnnet-out" in entry:
                q = entry["bnnet-out"]
                torch_ratio = (
                    f", torch/this **{entry['torch']['median'] / q['median']:.2f}x**" if "torch" in entry else ""
                )
                row.append(f"{q['median'] * 1e6:.0f} us, {q['pct_bandwidth']:.0f}% bw{torch_ratio}")
            bn_rows.append(row)
            log(row)
        md.append(
            ""
            if not bn_rows
            else "\n## BatchNorm forward + backward (train mode, float32)\n\nbnnet: min / median us, ns per element, "
            f"GB/s at {BYTES_PER_ELEMENT} bytes/element (% of the copy rate of arrays its size); each peer: median and "
            "its time divided by bnnet's (> 1: bnnet is faster).\n\n"
        )
        if bn_rows:
            md.append(
                fmt_table(
                    ["shape", "bnnet us", "ns/elem", "GB/s"]
                    + [l for l in libs if l != "bnnet"]
                    + (["bnnet with out="] if "bnnet" in libs else []),
                    bn_rows,
                )
            )
        # flatness: bnnet's ns/element as the batch grows at D = 100
        if "bnnet" in libs and "flat" in only:
            rows = [10_000, 30_000, 100_000, 300_000] + ([] if args.quick else [1_000_000])
            flat = {}
            for n in rows:
                t = summarize(
                    sum(
                        (
                            ours.ask(task="bn", shape=[n, 100], reps=reps, min_seconds=0.3)["times"]
                            for _ in range(rounds)
                        ),
                        [],
                    )
                )
                flat[n] = t["median"] / (n * 100) * 1e9
            report["bn_flatness_D100"] = flat
            spread = 100 * (max(flat.values()) / min(flat.values()) - 1)
            md.append(
                "\nbnnet ns/element at D=100 as rows grow: "
                + ", ".join(f"{n:,}: {v:.2f}" for n, v in flat.items())
                + f" (spread {spread:.0f}%).\n"
            )
            log(md[-1])

        # 3. training steps
        step_libs = [l for l in libs if l != "bnnet-numpy"]
        report["step"], step_rows = {}, []
        for name, net in NETS.items() if "step" in only else []:
            res = alternate(
                {k: w for k, w in workers.items() if k[0] in step_libs},
                rounds,
                dict(task="step", reps=reps * 5, min_seconds=0.5 if args.quick else 2.0, **net),
            )
            entry = {}
            for lib in step_libs:
                th, r = best_threads(res, lib)
                entry[lib] = {**r, "threads": th, "samples_per_s": net["batch"] / r["median"]}
            flops, nbytes = gemm_flops(net["sizes"], net["batch"]), bn_bytes(net["sizes"], net["batch"])
            roof = flops / (gemm["2048x2048x2048"] * 1e9) + nbytes / (bandwidth * 1e9)
            entry["roofline"] = {
                "gemm_flops": flops,
                "bn_bytes": nbytes,
                "seconds": roof,
                "bnnet_fraction": roof / entry["bnnet"]["median"],
            }
            bw_ = workers[("bnnet", entry["bnnet"]["threads"])]
            # the same step built once (bnnet.compile_step), and bnnet.fit per mini-batch, on bnnet's
            # best thread count, alternated round by round with the lecture's loop
            for mode in ("compiled", "fit"):
                times = []
                for _ in range(rounds):
                    for m in ("loop", mode):
                        t = bw_.ask(task="step", mode=m, reps=reps * 5, min_seconds=0.5 if args.quick else 1.0, **net)
                        if m == mode:
                            times += t["times"]
                r = summarize(times)
                entry[f"bnnet-{mode}"] = {
                    **r,
                    "threads": entry["bnnet"]["threads"],
                    "samples_per_s": net["batch"] / r["median"],
                }
            g = summarize(
                sum((bw_.ask(task="gemms", reps=reps * 5, min_seconds=0.5, **net)["times"] for _ in range(rounds)), [])
            )
            entry["gemm_share"] = g["median"] / entry["bnnet"]["median"]
            report["step"][name] = entry
            o = entry["bnnet"]
            row = [
                name,
                f"{'-'.join(map(str, net['sizes']))} {net['activation']}, batch {net['batch']}",
                f"{o['samples_per_s']:,.0f} ({o['threads']} thr)",
            ]
            for variant in ("bnnet-compiled", "bnnet-fit"):
                row.append(f"{entry[variant]['samples_per_s']:,.0f}")
            for peer in [l for l in step_libs if l != "bnnet"]:
                row.append(
                    f"{entry[peer]['samples_per_s']:,.0f} ({entry[peer]['threads']} thr) = "
                    f"**{o['samples_per_s'] / entry[peer]['samples_per_s']:.2f}x** (compiled "
                    f"**{entry['bnnet-compiled']['samples_per_s'] / entry[peer]['samples_per_s']:.2f}x**)"
                )
            row.append(f"{net['batch'] / roof:,.0f}: bnnet at {100 * entry['roofline']['bnnet_fraction']:.0f}%")
            row.append(f"{100 * entry['gemm_share']:.0f}%")
            step_rows.append(row)
            log(row)
        md.append(
            ""
            if not step_rows
            else "\n## Training step (forward, loss, backward, SGD update), samples/s\n\nbnnet vs each peer: "
            "bnnet's rate divided by the peer's (> 1: bnnet is faster). Roofline: the net's matmul FLOPs at "
            "the measured 2048^3 sgemm rate plus its BN bytes at the measured bandwidth.\n\n"
        )
        if step_rows:
            md.append(
                fmt_table(
                    ["net", "shape", "bnnet (lecture loop)", "bnnet compile_step", "bnnet fit"]
                    + [l for l in step_libs if l != "bnnet"]
                    + ["roofline", "GEMMs' share of bnnet's step"],
                    step_rows,
                )
            )

        # same with the BLAS overrides unset, if this environment sets them
        if any(os.environ.get(v) for v in BLAS_OVERRIDES) and "bnnet" in libs and "step" in only:
            unset = Worker("bnnet", cores, unset=BLAS_OVERRIDES)
            try:
                g2 = unset.ask(task="sgemm", shapes=sgemm_shapes, reps=reps)
                rows = []
                report["blas_overrides_unset"] = {"sgemm_GFLOPs": g2, "step": {}}
                for name, net in NETS.items():
                    r = summarize(
                        sum(
                            (
                                unset.ask(task="step", reps=reps * 5, min_seconds=1.0, **net)["times"]
                                for _ in range(rounds)
                            ),
                            [],
                        )
                    )
                    sps = net["batch"] / r["median"]
                    report["blas_overrides_unset"]["step"][name] = {**r, "samples_per_s": sps}
                    peer = report["step"][name].get("jax", {}).get("samples_per_s")
                    rows.append([name, f"{sps:,.0f}", f"{sps / peer:.2f}x JAX" if peer else "-"])
                md.append(
                    f"\n### With {' and '.join(BLAS_OVERRIDES)} unset (what users' machines look like)\n\n"
                    f"numpy sgemm 2048^3: {g2['2048x2048x2048']:.0f} GFLOP/s.\n\n"
                )
                md.append(fmt_table(["net", "bnnet samples/s", "vs JAX"], rows))
            finally:
                unset.close()

        # folded BatchNorm for inference
        if "bnnet" in libs and "fold" in only:
            rows = []
            report["fold"] = {}
            backends = {"numba": ours}
            if ("bnnet-numpy", cores) in workers:
                backends["numpy"] = workers[("bnnet-numpy", cores)]
            for name, net in NETS.items():
                for bk, w in backends.items():
                    r = w.ask(task="predict", rows=10000, reps=reps, **net)
                    u, f = summarize(r["unfolded"]), summarize(r["folded"])
                    report["fold"][f"{name}/{bk}"] = {"unfolded": u, "folded": f}
                    rows.append(
                        [
                            name,
                            bk,
                            f"{10000 / u['median']:,.0f}",
                            f"{10000 / f['median']:,.0f}",
                            f"**{u['median'] / f['median']:.2f}x**",
                        ]
                    )
            md.append(
                "\n## Prediction (eval mode, 10,000 rows), samples/s: BatchNorm folded into the Linears\n\n"
                "With the numba backend eval-mode BN is already fused into the activation's pass, so folding "
                "saves little; with the NumPy backend it removes BN's passes.\n\n"
            )
            md.append(fmt_table(["net", "backend", "unfolded", "folded (bnnet.fold_batchnorm)", "speed-up"], rows))
            log(md[-1])

        # 7. convolutional nets: BatchNorm over (N, C, H, W), and a training step of bnnet.convnet
        bn2d_rows, report["bn2d"] = [], {}
        peers = [l for l in libs if l in ("bnnet", "torch", "jax")]
        for shape in BN2D_SHAPES if "bn2d" in only else []:
            res = alternate(
                {k: w for k, w in workers.items() if k[0] in peers},
                rounds,
                dict(task="bn", shape=list(shape), reps=reps, min_seconds=0.2 if args.quick else 0.5),
            )
            size, entry = 1, {}
            for d in shape:
                size *= d
            for lib in peers:
                th, r = best_threads(res, lib)
                entry[lib] = {**r, "threads": th, "GBps": BYTES_PER_ELEMENT * size / r["median"] / 1e9}
                entry[lib]["pct_bandwidth"] = 100 * entry[lib]["GBps"] / level_bandwidth(size)
            entry["level_GBps"] = level_bandwidth(size)
            report["bn2d"]["x".join(map(str, shape))] = entry
            o = entry["bnnet"]
            row = [
                "x".join(map(str, shape)),
                f"{o['median'] * 1e3:.2f} ms ({o['threads']} thr)",
                f"{o['GBps']:.1f} ({o['pct_bandwidth']:.0f}%)",
            ]
            row += [
                f"{entry[p]['median'] * 1e3:.2f} ms = **{entry[p]['median'] / o['median']:.2f}x**"
                for p in peers
                if p != "bnnet"
            ]
            bn2d_rows.append(row)
            log(row)
        if bn2d_rows:
            md.append(
                "\n## BatchNorm over (N, C, H, W), forward + backward (train mode, float32)\n\nbnnet's public "
                "layer; each peer's median and its time divided by bnnet's (> 1: bnnet is faster); GB/s at "
                f"{BYTES_PER_ELEMENT} bytes/element (% of the copy rate of arrays its size).\n\n"
            )
            md.append(fmt_table(["shape", "bnnet", "GB/s"] + [p for p in peers if p != "bnnet"], bn2d_rows))
        if "cnnstep" in only:
            res = alternate(
                {k: w for k, w in workers.items() if k[0] in peers},
                rounds,
                dict(task="cnnstep", reps=reps * 2, min_seconds=0.5 if args.quick else 2.0, **CNN),
            )
            entry = {}
            for lib in peers:
                th, r = best_threads(res, lib)
                entry[lib] = {**r, "threads": th, "samples_per_s": CNN["batch"] / r["median"]}
            flops = cnn_flops(CNN["channels"], CNN["hidden"], CNN["batch"])
            roof = flops / (gemm["2048x2048x2048"] * 1e9)
            prof = workers[("bnnet", entry["bnnet"]["threads"])].ask(
                task="cnnstep", reps=reps, min_seconds=0.5, profile=True, **CNN
            )
            entry["roofline"] = {"flops": flops, "seconds": roof, "bnnet_fraction": roof / entry["bnnet"]["median"]}
            entry["conv_share"] = prof["conv_seconds"] / statistics.median(prof["times"])
            report["cnnstep"] = entry
            o = entry["bnnet"]
            row = [
                f"conv {'-'.join(map(str, CNN['channels']))} fc {'-'.join(map(str, CNN['hidden']))}, batch "
                f"{CNN['batch']}",
                f"{o['samples_per_s']:,.0f} ({o['threads']} thr)",
            ]
            row += [
                f"{entry[p]['samples_per_s']:,.0f} ({entry[p]['threads']} thr) = "
                f"**{o['samples_per_s'] / entry[p]['samples_per_s']:.2f}x**"
                for p in peers
                if p != "bnnet"
            ]
            row += [
                f"{CNN['batch'] / roof:,.0f}: bnnet at {100 * entry['roofline']['bnnet_fraction']:.0f}%",
                f"{100 * entry['conv_share']:.0f}%",
            ]
            md.append(
                "\n## Convnet training step (bnnet.convnet, 28x28, SGD), samples/s\n\nbnnet vs each peer: "
                "bnnet's rate divided by the peer's (> 1: bnnet is faster). Roofline: the net's convolution and "
                "matmul FLOPs at the measured 2048^3 sgemm rate.\n\n"
            )
            md.append(
                fmt_table(
                    ["net", "bnnet"]
                    + [p for p in peers if p != "bnnet"]
                    + ["roofline", "Conv2d layers' share of bnnet's step"],
                    [row],
                )
            )
            log(row)

        # 4. memory
        if "bnnet" in libs and "memory" in only:
            mem = ours.ask(task="memory", **dict(NETS["wide"], batch=4096))
            need = mem["params"] + mem["grads"] + mem["optimizer_state"] + mem["activations"] + mem["input_batch"]
            mem["needed_bytes"], mem["ratio"] = need, mem["peak_bytes"] / need
            report["memory"] = mem
            md.append(
                f"\n## Memory of a wide-net step at batch 4096 (SGD)\n\n"
                f"Peak traced memory {mem['peak_bytes'] / 2**20:.1f} MiB "
                f"vs {need / 2**20:.1f} MiB needed (params {mem['params'] / 2**20:.1f} + "
                f"grads {mem['grads'] / 2**20:.1f} + optimizer state {mem['optimizer_state'] / 2**20:.1f} + "
                f"cached activations {mem['activations'] / 2**20:.1f} "
                f"+ input batch {mem['input_batch'] / 2**20:.1f}): **{mem['ratio']:.2f}x**.\n"
            )
            log(md[-1])
    finally:
        for w in workers.values():
            w.close()

    # 5. start-up with a cold and a warm numba cache
    if "bnnet" in libs and "startup" in only:
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = startup(cache), startup(cache)
        with tempfile.TemporaryDirectory() as cache:  # the convnet's kernels, from a cold cache of their own
            cnn_cold, cnn_warm = startup(cache, "cnn"), startup(cache, "cnn")
        report["startup"] = {"cold": cold, "warm": warm, "cnn cold": cnn_cold, "cnn warm": cnn_warm}
        md.append(
            "\n## Start-up (import + first training step with Adam and a predict: the paper's net, "
            "and `bnnet.convnet()` from a cold cache of its own)\n\n"
        )
        md.append(
            fmt_table(
                ["numba cache", "process s", "import s", "first step s", "compile or cache load s"],
                [
                    [
                        k,
                        f"{v['process_seconds']:.2f}",
                        f"{v['import_seconds']:.2f}",
                        f"{v['first_step_seconds']:.2f}",
                        f"{v['compile_or_load_seconds']:.2f}",
                    ]
                    for k, v in report["startup"].items()
                ],
            )
        )
        log(md[-1])

    # 5a. the README's first command: `bnnet train` with its defaults, seeds 0-2
    if "bnnet" in libs and "train" in only:
        report["train"] = train_section()
        md.append(
            "\n## `bnnet train` (defaults: the paper's net, 20 epochs)\n\n"
            + fmt_table(
                ["seed", "test accuracy", "training s", "wall s"],
                [
                    [r["seed"], f"{r['test_accuracy']:.3f}", f"{r['train_seconds']:.2f}", f"{r['wall_seconds']:.2f}"]
                    for r in report["train"]
                ],
            )
        )
        log(md[-1])

    # 7b. `bnnet train --model cnn` with its defaults
    if "bnnet" in libs and "cnntrain" in only:
        report["cnntrain"] = train_section(["--model", "cnn"], seeds=(0,))
        md.append(
            "\n## `bnnet train --model cnn` (defaults: conv 32-64, fc 128, 20 epochs)\n\n"
            + fmt_table(
                ["seed", "test accuracy", "training s", "wall s"],
                [
                    [r["seed"], f"{r['test_accuracy']:.3f}", f"{r['train_seconds']:.2f}", f"{r['wall_seconds']:.2f}"]
                    for r in report["cnntrain"]
                ],
            )
        )
        log(md[-1])

    # 5b. a busy machine: `bnnet train` for 2 epochs alone and next to busy-loop processes
    if "bnnet" in libs and "busy" in only:
        report["busy"] = busy_section(cores, rounds, log)
        b = report["busy"]
        md.append(
            "\n## `bnnet train --epochs 2` on a busy machine (training seconds, median of "
            f"{max(rounds, 5)} runs each)\n\n"
        )
        md.append(
            fmt_table(
                ["setting", "idle", f"next to {cores} busy loops", "slowdown"],
                [
                    [k, f"{v['idle']:.2f}", f"{v['busy']:.2f}", f"**{v['busy'] / v['idle']:.2f}x**"]
                    for k, v in b.items()
                ],
            )
        )
        log(md[-1])

    # 6. data-parallel training over MPI: 1, 2, 4 ranks, synchronized vs local BatchNorm
    if "bnnet" in libs and "mpi" in only:
        report["mpi"] = mpi_section(args.quick, log)
        md.append(mpi_markdown(report["mpi"]))
        log(md[-1])

    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = "".join(md)
    for name in (f"{'bench' if args.name == 'latest' else args.name}-{stamp}", args.name):
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write(text)
    print("\n" + text)
    print(f"saved {os.path.join(args.out, args.name + '.json')} and {args.name}.md")


if __name__ == "__main__":
    main()
