"""GPU benchmarks: bnnet's cuda backend against PyTorch and JAX on an NVIDIA GPU; JSON + markdown out.

    python benchmarks/gpu.py [--quick] [--out benchmarks/results]    on a machine with a GPU
    python benchmarks/gpu.py --simulate --out DIR                       the harness alone, on numba's
                                                                         CUDA simulator (tiny shapes,
                                                                         bnnet only; the times mean nothing)

What it measures (each library in its own process, one at a time, rounds alternated):
  1. device-to-device copy bandwidth (CuPy, read + write counted): the ceiling of a memory-bound kernel;
  2. BatchNorm forward + backward in train mode, float32, producing dx, dgamma and dbeta, at the shapes
     below: bnnet through bnnet.ops (identity, and with the sigmoid fused into both passes), PyTorch
     (F.batch_norm + autograd, and + torch.sigmoid), JAX (jit of BN and its vjp, and + sigmoid).
     Each call is followed by a device synchronization, so a time is what a user waits for;
     median of `reps` calls after `warmup`, pooled over the rounds. Bandwidth at 32 bytes per element.
Writes gpu.json (with date, machine and versions) and gpu.md (the table and the targets).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(256, 1024), (4096, 1024), (65536, 1024), (1000000, 100), (4000000, 256)]
TARGET_SHAPES = [(65536, 1024), (1000000, 100), (4000000, 256)]
BYTES_PER_ELEMENT = 32  # read x twice, write y, read dy and x twice, write dx (4-byte floats)
ACTS = ("identity", "sigmoid")


# --------------------------------------------------------------------------
# Workers: `python gpu.py --worker LIB`, one JSON task per line on stdin
# --------------------------------------------------------------------------


def _timed(step, warmup, reps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


class BnnetCuda:
    def __init__(self):
        from bnnet import backend, ops
        from bnnet.device import simulated, to_device

        backend.set_backend("cuda")
        self.ops, self.to_device = ops, to_device
        if simulated():
            self.xp, self.sync = np, lambda: None
        else:
            import cupy

            self.xp, self.sync = cupy, lambda: cupy.cuda.get_current_stream().synchronize()

    def info(self, task):
        import numba

        import bnnet

        out = {"library": f"bnnet {bnnet.__version__} (cuda)", "numba": numba.__version__}
        if self.xp is not np:
            dev = self.xp.cuda.Device()
            out["cupy"] = self.xp.__version__
            out["gpu"] = self.xp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
        else:
            out["gpu"] = "numba CUDA simulator"
        return out

    def copy(self, task):
        xp = self.xp
        a = xp.ones(task["elements"], xp.float32)
        b = xp.empty_like(a)

        def step():
            xp.copyto(b, a)
            self.sync()

        times = _timed(step, task["warmup"], task["reps"])
        return {"times": times, "bytes": 2 * a.nbytes}

    def bn(self, task):
        ops, xp = self.ops, self.xp  # (under the simulator empty_like keeps the device subclass)
        shape, d = tuple(task["shape"]), task["shape"][1]
        rng = np.random.default_rng(0)
        x = self.to_device(rng.standard_normal(shape, dtype=np.float32), "cuda")
        dy = self.to_device(rng.standard_normal(shape, dtype=np.float32), "cuda")
        dev = lambda a: self.to_device(a, "cuda")  # noqa: E731
        gamma, beta = dev(np.ones(d, np.float32)), dev(np.zeros(d, np.float32))
        rm, rv = dev(np.zeros(d, np.float32)), dev(np.ones(d, np.float32))
        out, dx = xp.empty_like(x), xp.empty_like(x)
        mean, var, inv = (dev(np.empty(d)) for _ in range(3))
        dg, db = dev(np.empty(d, np.float32)), dev(np.empty(d, np.float32))
        act = ops.SIGMOID if task["act"] == "sigmoid" else ops.IDENTITY

        def step():
            ops.bn_forward(x, gamma, beta, 1e-5, act, 0.0, True, rm, rv, 0.9, 1.0, out, mean, var, inv)
            ops.bn_backward(dy, out, x, mean, inv, gamma, act, 0.0, True, dx, dg, db)
            self.sync()

        return {"times": _timed(step, task["warmup"], task["reps"])}


class Torch:
    def __init__(self):
        import torch

        self.torch = torch

    def info(self, task):
        return {"library": f"torch {self.torch.__version__}", "gpu": self.torch.cuda.get_device_name()}

    def bn(self, task):
        torch = self.torch
        shape = task["shape"]
        x = torch.randn(*shape, device="cuda", requires_grad=True)
        w = torch.ones(shape[1], device="cuda", requires_grad=True)
        b = torch.zeros(shape[1], device="cuda", requires_grad=True)
        dy = torch.randn(*shape, device="cuda")
        rm, rv = torch.zeros(shape[1], device="cuda"), torch.ones(shape[1], device="cuda")
        sigmoid = task["act"] == "sigmoid"

        def step():
            y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
            if sigmoid:
                y = torch.sigmoid(y)
            x.grad = w.grad = b.grad = None
            y.backward(dy)
            torch.cuda.synchronize()

        return {"times": _timed(step, task["warmup"], task["reps"])}


class Jax:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def info(self, task):
        return {"library": f"jax {self.jax.__version__}", "gpu": str(self.jax.devices()[0])}

    def bn(self, task):
        jax, jnp = self.jax, self.jnp
        shape = tuple(task["shape"])
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        dy = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        g, b = jnp.ones(shape[1], jnp.float32), jnp.zeros(shape[1], jnp.float32)
        sigmoid = task["act"] == "sigmoid"

        def bn(x, g, b):
            mean = x.mean(axis=0)
            var = ((x - mean) ** 2).mean(axis=0)
            y = (x - mean) / jnp.sqrt(var + 1e-5) * g + b
            return (jax.nn.sigmoid(y) if sigmoid else y), mean, var

        @jax.jit
        def fwd_bwd(x, g, b, dy):
            (y, mean, var), vjp = jax.vjp(bn, x, g, b)
            return (y, mean, var, *vjp((dy, jnp.zeros_like(mean), jnp.zeros_like(var))))

        def step():
            jax.block_until_ready(fwd_bwd(x, g, b, dy))

        return {"times": _timed(step, task["warmup"], task["reps"])}


def worker(lib):
    impl = {"bnnet": BnnetCuda, "torch": Torch, "jax": Jax}[lib]()
    print(json.dumps({"ready": lib}), flush=True)
    for line in sys.stdin:
        task = json.loads(line)
        try:
            result = getattr(impl, task["task"])(task)
        except Exception as e:  # report it, keep serving
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------


class Worker:
    def __init__(self, lib):
        self.lib = lib
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", lib],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if not self.proc.stdout.readline():
            raise RuntimeError(f"the {lib} worker did not start (is {lib} installed with GPU support?)")

    def ask(self, **task):
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        if "error" in result:
            raise RuntimeError(f"{self.lib} failed on {task}: {result['error']}")
        return result

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _ratio(a, b):
    return None if not a or not b else a / b


def measure(libs, shapes, rounds, warmup, reps, copy_elements, log):
    workers = {lib: Worker(lib) for lib in libs}
    try:
        info = {lib: w.ask(task="info") for lib, w in workers.items()}
        log(f"workers: {info}")
        copy = workers["bnnet"].ask(task="copy", elements=copy_elements, warmup=warmup, reps=reps)
        copy_bw = copy["bytes"] / statistics.median(copy["times"])
        log(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s")
        rows = []
        for shape in shapes:
            for act in ACTS:
                pooled = {lib: [] for lib in libs}
                for _ in range(rounds):
                    for lib, w in workers.items():
                        pooled[lib] += w.ask(task="bn", shape=list(shape), act=act, warmup=warmup, reps=reps)["times"]
                med = {lib: statistics.median(t) for lib, t in pooled.items()}
                elements = shape[0] * shape[1]
                row = {
                    "shape": list(shape),
                    "act": act,
                    "median_s": med,
                    "bnnet_tb_s": BYTES_PER_ELEMENT * elements / med["bnnet"] / 1e12,
                    "bnnet_fraction_of_copy": BYTES_PER_ELEMENT * elements / med["bnnet"] / copy_bw,
                    "vs_torch": _ratio(med.get("torch"), med["bnnet"]),
                    "vs_jax": _ratio(med.get("jax"), med["bnnet"]),
                }
                rows.append(row)
                log(f"{shape} {act}: " + ", ".join(f"{lib} {t * 1e6:.0f} us" for lib, t in med.items()))
    finally:
        for w in workers.values():
            w.close()
    return info, copy_bw, rows


def targets(rows):
    """The issue's targets, each met or missed, from the measured rows."""
    out = []
    by = {(tuple(r["shape"]), r["act"]): r for r in rows}
    for shape in TARGET_SHAPES:
        r = by.get((shape, "identity"))
        if r is None:
            continue
        out.append({"what": f"BN fwd+bwd {shape[0]}x{shape[1]} >= 1.0x JAX", "value": r["vs_jax"], "goal": 1.0})
        out.append({"what": f"BN fwd+bwd {shape[0]}x{shape[1]} >= 1.1x PyTorch", "value": r["vs_torch"], "goal": 1.1})
        s = by.get((shape, "sigmoid"))
        if s is not None and s["vs_torch"] is not None:
            out.append(
                {"what": f"BN + sigmoid {shape[0]}x{shape[1]} >= 1.5x PyTorch", "value": s["vs_torch"], "goal": 1.5}
            )
    for t in out:
        t["met"] = t["value"] is not None and t["value"] >= t["goal"]
    return out


def markdown(result):
    lines = [
        f"GPU benchmarks ({result['date']}, {result['machine']['gpu']}; copy {result['copy_tb_s']:.2f} TB/s)",
        "",
        "| shape | act | bnnet | PyTorch | JAX | bnnet TB/s | x PyTorch | x JAX |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r["median_s"]

        def us(lib, m=m):
            return f"{m[lib] * 1e6:.0f} us" if lib in m else "-"

        def x(v):
            return f"{v:.2f}" if v is not None else "-"

        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {shape} | {r['act']} | {us('bnnet')} | {us('torch')} | {us('jax')} | "
            f"{r['bnnet_tb_s']:.2f} | {x(r['vs_torch'])} | {x(r['vs_jax'])} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in result["targets"]:
        value = f"{t['value']:.2f}x" if t["value"] is not None else "-"
        lines.append(f"| {t['what']} | {value} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="the two smallest shapes, fewer repetitions")
    ap.add_argument("--simulate", action="store_true", help="the harness on numba's CUDA simulator, bnnet only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        libs, shapes, warmup, reps, rounds, copy_elements = ["bnnet"], [(8, 4)], 1, 2, 1, 1000
    else:
        libs, shapes = ["bnnet", "torch", "jax"], (SHAPES[:2] if args.quick else SHAPES)
        warmup, reps, rounds, copy_elements = 10, (10 if args.quick else 30) // args.rounds or 1, args.rounds, 1 << 28
    info, copy_bw, rows = measure(libs, shapes, rounds, warmup, reps, copy_elements, lambda s: print(s, flush=True))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"gpu": info["bnnet"]["gpu"], "host": platform.node(), "cpu": platform.processor()},
        "libraries": info,
        "protocol": f"median of {reps * rounds} calls ({rounds} rounds alternated) after {warmup} warm-ups, "
        "device synchronized after each call",
        "simulated": args.simulate,
        "copy_tb_s": copy_bw / 1e12,
        "rows": rows,
        "targets": targets(rows),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
